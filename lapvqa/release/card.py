"""MODEL_CARD.md of a release: provenance (run, steps, validation loss, data manifest hash, training
config, file hashes) and the usage snippet, which the tests execute verbatim."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from lapvqa.release import artifacts


def usage_snippet(config) -> str:
    """Python that loads this release; for the card's architecture it is the card's exact code."""
    from lapvqa.pretrain.model import get_config

    is_card = dataclasses.replace(config, name="card") == get_config("card")
    make = ("CaptioningModel().eval()  # the card's architecture" if is_card else
            'CaptioningModel(ModelConfig.from_dict(json.load(open("config.json")))).eval()')
    imports = ("import torch\nfrom lapvqa.pretrain.model import CaptioningModel\n" if is_card else
               "import json\nimport torch\nfrom lapvqa.pretrain.model import CaptioningModel, ModelConfig\n")
    s, m, c = config.image_size, config.n_visual_tokens, config.enc_width
    return f"""{imports}from lapvqa.tokenizer import decode

model = {make}
model.load_state_dict(torch.load("model_best.pt", map_location="cpu"))
images = torch.zeros(2, 1, {s}, {s}, dtype=torch.uint8)  # [B, 1|3, {s}, {s}], uint8 or float in [0, 1]
ids = model.generate(images, max_new_tokens=20)  # greedy; num_beams=4 for beam search
reports = [decode([t for t in row.tolist() if t != {config.eot_id}]) for row in ids]

model.vision_encoder.load_state_dict(torch.load("encoder_final.pt", map_location="cpu"))
with torch.no_grad():
    features = model.vision_encoder(images)  # [2, {m}, {c}]: the last step's encoder
"""


def _find_key(obj, key: str):
    if isinstance(obj, dict):
        if isinstance(obj.get(key), str):
            return obj[key]
        for v in obj.values():
            found = _find_key(v, key)
            if found:
                return found
    return None


def manifest_sha256(client_state: dict) -> str:
    """The run's record of the data manifest hash, else the hash of the manifest it points at."""
    recorded = _find_key(client_state, "manifest_sha256")
    if recorded:
        return recorded
    shards = _find_key(client_state.get("config", {}), "shards")
    if not shards:
        return "unknown (the run recorded neither the hash nor the shard location)"
    try:
        from lapvqa.storage import open_store

        data = open_store(shards).read_bytes("manifest.json")
        return f"{hashlib.sha256(data).hexdigest()} (read from {shards}/manifest.json at release time)"
    except Exception as exc:  # unreachable store: say so in the card rather than fail the release
        return f"unknown ({shards}/manifest.json not readable: {type(exc).__name__})"


def _training_config(run_dir: str, client_state: dict) -> tuple[str, str]:
    path = os.path.join(run_dir, "config.yaml")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return "yaml", f.read().rstrip()
    return "json", json.dumps(client_state.get("config", {}), indent=2, default=str)


def _normalisation(config) -> str:
    if config.pixel_norm == "pixel":
        return ("per-pixel mean/std maps of the training images, stored in the weights "
                "(`vision_encoder.pixel_mean_map` / `pixel_std_map`); `model.vision_encoder` applies them")
    return f"`(x - {list(config.pixel_mean)}) / {list(config.pixel_std)}` per channel, pixels x in [0, 1]"


def write_card(folder, run_dir, info, best_ckpt, last_ckpt, config, sums: dict) -> None:
    best_loss = info.best.get("val_loss")
    lang, train_cfg = _training_config(run_dir, best_ckpt.client_state)
    files = "\n".join(f"| `{n}` | `{h}` |" for n, h in sums.items())
    text = f"""# lapvqa chest X-ray report generator: release card

Consolidated by `python -m lapvqa.consolidate` from `{os.path.abspath(run_dir)}`.

| | |
| --- | --- |
| `model_best.pt` | full `CaptioningModel` state_dict at the best validation loss: checkpoint `{info.best_tag}`, step {best_ckpt.client_state.get("step", info.best.get("step"))}, validation loss {best_loss if best_loss is not None else "n/a"} |
| `encoder_final.pt` | `model.vision_encoder` state_dict at the last complete checkpoint: `{info.last_tag}`, step {info.last_step} |
| weights | fp32 master weights of DeepSpeed ZeRO (world size {best_ckpt.world_size}), plain dicts of tensors (`torch.load` with `weights_only=True`) |
| architecture | `{config.name}`: ViT {config.enc_depth}x{config.enc_width} ({config.image_size} px, patch {config.patch_size}) -> {config.n_visual_tokens} visual tokens; decoder {config.dec_depth}x{config.dec_width}, vocabulary {config.vocab_size} (tied embeddings); full sizes in `config.json` |
| input normalisation | {_normalisation(config)} |
| data manifest sha256 | {manifest_sha256(best_ckpt.client_state)} |

## Usage

```python
{usage_snippet(config).rstrip()}
```

## Files (sha256; verify with `sha256sum -c SHA256SUMS`)

| file | sha256 |
| --- | --- |
{files}

## Training config

```{lang}
{train_cfg}
```
"""
    path = os.path.join(folder, artifacts.CARD_FILE)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.join(folder, artifacts.SUMS_FILE), "a", encoding="utf-8") as f:
        f.write(f"{artifacts.sha256_file(path)}  {artifacts.CARD_FILE}\n")
