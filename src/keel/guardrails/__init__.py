"""Guardrails: checks on what goes to a model (length, prompt injection, PII and secrets) and on what
comes back (PII and secrets, deny patterns, off-topic, harmful), with the actions block, redact and flag.
"""
