"""Evaluation: the Open LLM Leaderboard suite (ARC, HellaSwag, MMLU, TruthfulQA) as the harness scores it."""
