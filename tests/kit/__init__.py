"""What the tests and the benchmarks share, one module per topic; nothing here downloads anything.

- `data`: random token ids, sentences in the --data-dir layout, a local lm-eval task, ScienceQA / TextVQA parquet files
- `tiny_tokenizers`: byte-level BPEs like OPT's and LLaMA's, trained in milliseconds
- `tiny_models`: random OPT, LLaMA-family and LLaVA checkpoints in the Hugging Face layout, with their references
- `references`: SparseGPT's `fasterprune` transcribed line for line
- `checks`: assertions whose failure messages explain themselves, offload traces
- `commands`: the commands run in this process on the tiny models
- `ranks`: processes started as torchrun starts them
- `timing`: the benchmarks' timer
- `marks`: pytest marks (only the tests import this one: the benchmarks never import pytest)
"""
