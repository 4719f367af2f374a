"""The application: the ``spanbert-fast`` command line and what it runs (pretraining, SQuAD
fine-tuning, corpus reading, tokenization, the training loop's pieces).

It may import the library (``spanbert_fast`` and its ``ops``/``masking``) and the benchmark
suite; the library never imports it.
"""
