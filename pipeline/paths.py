"""Where each stage's outputs live, relative to the repository root: the paths of dvc.yaml.

Stages read their inputs and write their outputs through these names only, so no stage imports
another to learn a path. A test checks that dvc.yaml declares the same paths.
"""

from pathlib import Path

DATA_DIR = Path("data")

# check: the same bytes for any valid params (see pipeline/stages/check.py)
PARAMS_CHECKED_PATH = DATA_DIR / "check" / "params.json"

# download
CORPUS_PATH = DATA_DIR / "raw" / "input.txt"
DOWNLOAD_INFO_PATH = DATA_DIR / "raw" / "download.json"

# What the vocab stage reads from download.json (read_json checks it before any work).
DOWNLOAD_INFO_FIELDS = {"sha256": str}

# vocab
VOCAB_PATH = DATA_DIR / "vocab" / "vocab.json"
TRAIN_TOKENS_PATH = DATA_DIR / "vocab" / "train.npy"
VAL_TOKENS_PATH = DATA_DIR / "vocab" / "val.npy"
MANIFEST_PATH = DATA_DIR / "vocab" / "manifest.json"

# What the train stage reads from manifest.json.
MANIFEST_FIELDS = {"corpus_sha256": str}

# train
MODEL_PATH = DATA_DIR / "train" / "model.pt"
LOSS_CURVE_PATH = DATA_DIR / "train" / "loss_curve.csv"
# Written by train and by link; a top-level params file of dvc.yaml, not a stage output.
RUN_INFO_PATH = DATA_DIR / "train" / "run.json"

# Not an output: the train stage's checkpoints, one file per params, data and code it was made
# from, kept until its training completes (pipeline/stages/train.py says why outside the outs).
CHECKPOINT_DIR = Path("checkpoints")

# evaluate
METRICS_PATH = DATA_DIR / "evaluate" / "metrics.json"
PROBS_PLOT_PATH = DATA_DIR / "evaluate" / "next_char_probs.png"

# register: the served model's sampling defaults (the name pipeline.lm.sampling gives the file)
SAMPLING_DEFAULTS_PATH = DATA_DIR / "register" / "sampling_defaults.json"

# sample
SAMPLE_PATH = DATA_DIR / "sample" / "sample.txt"
