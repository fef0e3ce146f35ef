"""Opt-in speed transforms: functions model -> model, each with an equivalence test."""
