"""Alerting: rules, evaluator, alert state, routing, grouping, silences, inhibition."""
