"""Evaluation: inference primitives (batched next-token log-probs, the one KV-cached decode loop, the
first-token metric), answer scoring, and trait evaluation."""
