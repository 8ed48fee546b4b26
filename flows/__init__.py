"""Prefect wiring for livo: flows and tasks that call `livo_core` stages. No model code lives here."""
