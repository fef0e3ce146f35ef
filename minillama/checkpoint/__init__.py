"""The checkpoint stage, one home for loading and saving: load.py resolves a name and reads any format
(hf.py, gguf.py, meta.py), hf.py writes Hugging Face folders, run_state.py saves and resumes training
runs, atomic.py is the write-then-rename every writer uses."""

from minillama.checkpoint.hf import save_model
from minillama.checkpoint.load import DTYPES, load_config, load_model, load_model_and_tokenizer

__all__ = ["DTYPES", "load_config", "load_model", "load_model_and_tokenizer", "save_model"]
