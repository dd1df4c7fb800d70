"""Measuring a model: how well it predicts text, answers multiple-choice tasks, and learned its responses.

    text.py     perplexity and bits per byte of a text file (sliding window); response loss on records
    tasks.py    multiple choice by length-normalised log-likelihood (HellaSwag/ARC style), with a 95% interval
    harness.py  `TegakiLM`: an adapter so lm-evaluation-harness (`lm_eval`) can drive a tegaki model

Library code: each function takes a model and a tokenizer and returns numbers; `tegaki eval` prints them.
"""
