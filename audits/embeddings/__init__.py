"""``safelm audit embeddings``: the Word Embedding Association Test (WEAT, Caliskan, Bryson and
Narayanan, Science 2017) on a word-vector file or a SafeLM run's input embeddings."""
