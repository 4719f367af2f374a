"""Paths of the small data files in tests/data/ that the CLI and training tests share."""

import os

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
CORPUS = os.path.join(DATA, "corpus.txt")        # 10 short English documents
VOCAB = os.path.join(DATA, "vocab.txt")          # a 400-entry cased WordPiece vocabulary
SQUAD = os.path.join(DATA, "squad_tiny.json")    # 20 SQuAD v1.1 questions
SQUAD_V2 = os.path.join(DATA, "squad_tiny_v2.json")
