"""Evaluation task families, one small module each: multiple_choice (ARC-Easy, ARC-Challenge, MMLU),
gsm8k, humaneval, core (the DCLM in-context tasks behind the CORE metric). Each loads its set in the
public format (JSONL or parquet) and scores as nanochat does; nanochat/evaluate.py runs them."""
