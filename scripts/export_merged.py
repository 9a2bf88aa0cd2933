"""Export a checkpoint as a plain Hugging Face model directory (LoRA adapters merged into the base).

    python scripts/export_merged.py RUN_DIR/LATEST OUT_DIR

The result loads with `AutoModelForCausalLM.from_pretrained(OUT_DIR)` with no PEFT or project code.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from omegaconf import OmegaConf  # noqa: E402


def export_merged(checkpoint: str, out_dir: str) -> None:
    """checkpoint: a step-N/ or LATEST directory written by the trainer."""
    from transformers import AutoTokenizer
    from models import archive_directory, load_model, quiet_peft
    directory = archive_directory(checkpoint)
    config = OmegaConf.load(os.path.join(directory, "config.yaml"))
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(directory, "tokenizer"))
    adapter = os.path.join(directory, "adapter")
    # the run's adapter started from an SFT adapter archive if there was one, so it replaces it: merge
    # onto the raw base; a full SFT archive (policy.pt) is the base the adapter was trained on
    if config.model.archive and os.path.isdir(os.path.join(archive_directory(config.model.archive), "adapter")):
        config.model.archive = None
    config.lora = config.qlora = False
    if os.path.isdir(adapter):
        from peft import PeftModel
        model = load_model(config, tokenizer, "float32")
        with quiet_peft():
            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    else:
        config.model.archive = directory
        model = load_model(config, tokenizer, "float32")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("out_dir")
    args = parser.parse_args()
    export_merged(args.checkpoint, args.out_dir)
    print(f"merged model written to {args.out_dir}")
