"""Saving tiny random models as checkpoints for the tests."""
from pathlib import Path

from checkpoint import model_state_for_saving, read_config, save_checkpoint
from convert import resolve_checkpoint


def save_tiny(model, out, tokenizer: bool = False) -> Path:
    """Save `model` as a float checkpoint folder; with `tokenizer`, it carries the default model's tokenizer
    (so its vocabulary must be 49152)."""
    meta, files = None, {}
    if tokenizer:
        default = resolve_checkpoint(None)
        meta = read_config(default)["tokenizer"]
        files = {meta["file"]: (default / meta["file"]).read_bytes()}
    save_checkpoint(out, model_state_for_saving(model.state_dict(), model.args),
                    {"model_args": model.args.to_dict(), "tokenizer": meta}, files)
    return Path(out)


def finish_gguf(writer, path) -> Path:
    """Write a gguf.GGUFWriter's header, metadata and tensors to `path` and close it."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
