"""SafeLM: train Transformer language models and text classifiers with differential privacy,
federate them with Flower and audit them for fairness and privacy leakage.

This module is the public API that ``federation`` and ``audits`` build on.
"""

import importlib
from typing import Any

# Public names and the module that defines each. Imported on first use, so that
# `safelm --help` and `import safelm.errors` do not pay for torch and Opacus start-up.
_EXPORTS = {
    "api": ["Prepared", "Run", "generate", "load_run", "predictions_table",
            "prepare", "score_encoded", "train_run", "write_csv", "model_sha256"],
    "config": ["Config", "DataConfig", "ModelConfig", "PrivacyConfig", "TrainConfig"],
    "data": ["Batch", "BlockDataset", "Encoded", "encode_rows", "load_rows", "read_splits",
             "split_rows"],
    "errors": ["ConfigError", "DataError", "UserError"],
    "explain": ["BASELINE", "INSTALL_HINT", "attention_from_last", "baseline_id", "class_probs", "encode_text",
                "integrated_gradients", "require_captum", "require_classifier",
                "token_strings", "word_spans"],
    "hashing": ["file_sha256", "meta_path", "read_model_sha256"],
    "hf": ["export_hf", "import_hf"],
    "lora": ["LoRALinear", "apply_lora", "count_trainable", "merge_lora"],
    "warmstart": ["SHAPE_KEYS", "apply_init_config", "base_model_config", "init_record",
                  "load_init_weights"],
    "model": ["LSTMModel", "Transformer", "build_model"],
    "privacy": ["DifferentialPrivacy", "make_privacy", "recompute_epsilon"],
    "tokenizer": ["Tokenizer"],
    "trainer": ["NoPrivacy", "Privacy", "Trainer", "batch_loss", "evaluate_model",
                "pick_device"],
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}

# Public modules whose names are public API without being re-exported here: use them as
# ``from safelm import rundir`` / ``from safelm.rundir import read_metrics``. ``federation``
# and ``audits`` may import from safelm only the names above and these
# (tests/test_layout.py enforces it, module by module).
PUBLIC_MODULES = {
    "corpus": ["sentiment_corpus", "story_corpus", "write_sentiment_csv", "write_story_text"],
    "files": ["atomic_write_bytes", "atomic_write_json", "atomic_write_text"],
    "hashing": ["HF_DIR", "META_KIND", "META_SUFFIX", "file_sha256", "listed_name_ok",
                "meta_path", "read_model_sha256"],
    "monitor": ["MLFLOW_DB", "TENSORBOARD_DIR", "check_available", "open_sinks", "scalars"],
    "rundir": ["CHECKSUMS", "CONFIG", "METRICS", "PRIVACY", "RELEASE_MANIFEST", "RELEASE_SUMS",
               "RESUME", "TOKENIZER", "WEIGHTS", "atomic_write_json", "atomic_write_text",
               "load_weights", "read_config", "read_metrics", "save_weights", "unwrap",
               "verify_checksums", "write_checksums"],
    "vectors": ["FORMATS", "detect_format", "read_vectors"],
}

__version__ = "0.1.0"
__all__ = sorted(_WHERE) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'safelm' has no attribute {name!r}")
