"""``convert``: a Hugging Face MoE checkpoint to a W4A8 checkpoint, streamed and resumable.

Units of work, in order: the tensors outside the decoder layers (embeddings, final norm,
``lm_head``), then each decoder layer. A unit's source tensors are read from the memory-mapped
shards when the unit starts and dropped when it ends. With learned clips the calibration
tokens' hidden states (``[S, T, H]``, model dtype, in memory) flow through transformers'
own decoder layer, one layer at a time, so every MoE layer is calibrated on the real hidden
states and routing of the layers before it (those of the unquantized source model).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import platform
import resource
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from w4a8moe.calibrate import ClipSearchSettings, ExpertClips, ExpertWeights, learn_expert_clips
from w4a8moe.calibrate.products import IntProducts
from w4a8moe.convert.distributed import ClipsOf, ExpertSplit, LearnOne
from w4a8moe.convert.policy import DEFAULT_KEEP_BF16, W8A8, LayerPolicy
from w4a8moe.convert.moe_error import StreamedMoEOutput
from w4a8moe.convert.progress import ProgressManifest
from w4a8moe.convert.runner import LayerRunner
from w4a8moe.convert.source import SourceCheckpoint
from w4a8moe.data import ByteTokenizer, load_text, load_user_text, token_batches
from w4a8moe.errors import CheckpointError, ConversionError
from w4a8moe.formats import open_checkpoint
from w4a8moe.formats.base import CheckpointFormat
from w4a8moe.formats.layer_tensors import FloatMoELayer, quantize_moe_layer
from w4a8moe.formats.model_config import EXPERT_PROJECTIONS
from w4a8moe.formats.safetensors_io import atomic_write_json
from w4a8moe.formats.registry import get_format
from w4a8moe.formats.writer import CheckpointWriter, moe_expert_tensors, moe_router_tensors, moe_shared_tensors
from w4a8moe.moe import select_experts
from w4a8moe.quant import pack_int4_pairs, quantize_int8_per_channel

REPORT_FILE = "conversion_report.json"
CONFIG_KEY = "w4a8moe"
CONVERTER_VERSION = 2
"""2: the alpha refinement's gradient by the Gram form by default (1: the direct form)."""
DEFAULT_CALIB_SEQUENCES = 32
DEFAULT_CALIB_SEQ_LEN = 256
HEAD_UNIT = "non_layer"


def _peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _rel(err: float, energy: float) -> float | None:
    return err / energy if energy > 0 else None


def calibration_tokens(source: SourceCheckpoint, calib: str | Path | None, tokenizer: str | Path | None,
                       num_sequences: int, seq_len: int) -> tuple[torch.Tensor, dict]:
    """Token windows ``[S, T]`` for calibration and a description of where they came from.

    Text: the file ``calib`` or the built-in ``calib`` split. Tokenizer: ``tokenizer`` (a local
    transformers tokenizer folder), else the source folder's own tokenizer files if present,
    else the byte tokenizer, which is only allowed when the model's vocabulary has >= 256 ids.
    """
    text = load_user_text(calib) if calib is not None else load_text("calib")
    info: dict = {"text": "file" if calib is not None else "built-in calib split",
                  "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}
    tok_dir = Path(tokenizer) if tokenizer is not None else None
    if tok_dir is None and any((source.path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        tok_dir = source.path
    if tok_dir is not None:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ConversionError(f"cannot load the tokenizer in {tok_dir}: {exc}") from exc
        ids = torch.tensor(tok(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.int64)
        info["tokenizer"] = "source folder" if tok_dir == source.path else "given folder"
    else:
        vocab = int(source.config.get("vocab_size") or 0)
        if vocab < 256:
            raise ConversionError(
                f"the model's vocab_size is {vocab} (< 256) and no tokenizer was given: pass tokenizer= (--tokenizer DIR)"
            )
        ids = ByteTokenizer().encode(text)
        info["tokenizer"] = "byte tokenizer (fallback: no tokenizer given or found; vocab_size >= 256)"
    vocab = int(source.config.get("vocab_size") or 0)
    if ids.numel() and vocab and int(ids.max()) >= vocab:
        raise ConversionError(f"the tokenizer produced id {int(ids.max())} >= the model's vocab_size {vocab}")
    available = ids.numel() // seq_len
    if available < 1:
        raise ConversionError(f"calibration text gives {ids.numel()} tokens, fewer than one sequence of {seq_len}")
    batches = token_batches(ids, seq_len, min(num_sequences, available))
    info.update(sequences=int(batches.shape[0]), seq_len=seq_len, tokens=int(batches.numel()),
                ids_sha256=hashlib.sha256(batches.numpy().tobytes()).hexdigest())
    return batches, info


def _source_identity(source: SourceCheckpoint) -> dict:
    files = sorted({info.file for info in source.reader.infos.values()})
    return {
        "config_sha256": hashlib.sha256((source.path / "config.json").read_bytes()).hexdigest(),
        "shards": [[f.name, f.stat().st_size] for f in files],
    }


class _Run:
    """State shared between the unit loop and the writer's flush callback."""

    def __init__(self) -> None:
        self.unit = 0
        self.hidden: torch.Tensor | None = None
        self.hidden_saved_for: int | None = None
        self.reports: dict[str, dict] = {}
        self.unit_keys: list[str] = []
        self.shards_written = 0


def _converter_version(clip_settings: ClipSearchSettings | None) -> int:
    """The converter version a run's output is that of: a learned run with the direct form of
    the alpha refinement gives version 1's bits (and resumes a version-1 conversion)."""
    return 1 if clip_settings is not None and clip_settings.refine_form == "direct" else CONVERTER_VERSION


def _clip_search_identity(clip_settings: ClipSearchSettings) -> dict:
    """The clip settings as recorded (and hashed); version 1 had no ``refine_form``, so the
    direct form leaves it out and keeps version 1's settings hash."""
    identity = asdict(clip_settings)
    if clip_settings.refine_form == "direct":
        del identity["refine_form"]
    return identity


def convert(
    src: str | Path,
    dst: str | Path,
    fmt: str | CheckpointFormat = "compressed-tensors",
    learn: bool = True,
    calib: str | Path | None = None,
    tokenizer: str | Path | None = None,
    calib_sequences: int = DEFAULT_CALIB_SEQUENCES,
    calib_seq_len: int = DEFAULT_CALIB_SEQ_LEN,
    clip_settings: ClipSearchSettings | None = None,
    resume: bool = False,
    keep_bf16: tuple[str, ...] | list[str] | None = None,
    max_shard_bytes: int = 4 << 30,
    batch_size: int = 8,
    num_threads: int | None = None,
    progress: bool = True,
    quant_method: str | None = None,
    device: str = "cpu",
    _fail_after_shards: int | None = None,
) -> dict:
    """Convert the Hugging Face MoE checkpoint folder ``src`` to a W4A8 checkpoint in ``dst``.

    ``fmt``: ``"compressed-tensors"`` (per-expert activation clip ``alpha`` stored,
    ``activation_use_clip`` set) or ``"ascendv1"`` (no clip tensor; the learned weight clips
    are still baked into the scales, and activation clips are not learned since the format
    cannot carry them). ``learn=False`` gives round-to-nearest with every clip 1. ``calib``:
    a UTF-8 text file (default: the built-in calibration split), cut into ``calib_sequences``
    windows of ``calib_seq_len`` tokens; ``tokenizer``: a local tokenizer folder.
    ``keep_bf16``: module-name regexes left unquantized (default :data:`DEFAULT_KEEP_BF16`; a
    given list replaces it). ``resume=True`` continues an interrupted conversion into ``dst``
    with the same settings, however it was interrupted (a finished one is left as it is).
    ``num_threads`` sets torch's thread count for the run.
    ``quant_method``: the compressed-tensors spelling written, ``"compressed-tensors"``
    (default) or ``"modelslim"`` (what sglang 0.5.7's NPU path loads); AscendV1 has none.
    The native kernel's products follow ``num_threads``. ``device`` (``"cpu"`` or ``"cuda"``) runs the
    calibration forward and the clip search there, with exact integer products on either
    (:mod:`w4a8moe.calibrate.products`). Under ``torchrun`` the experts of each MoE layer are
    split across the processes (:mod:`w4a8moe.convert.distributed`); rank 0 writes and
    returns the report, the other ranks return ``{}``.

    Returns the report (also written to ``dst/conversion_report.json``, without the timing
    and memory figures, which vary between runs). Raises :class:`ConversionError`,
    :class:`CheckpointError` or :class:`ConfigError` naming the file or tensor at fault.
    ``_fail_after_shards`` (testing) raises after that many shards are written in this run.
    """
    try:
        fmt = get_format(fmt)
        fmt.write_options(quant_method=quant_method)
    except ValueError as exc:
        raise ConversionError(str(exc)) from exc
    if max_shard_bytes < 1:
        raise ConversionError("max_shard_bytes must be positive")
    try:
        kind = torch.device(device).type
    except RuntimeError as exc:
        raise ConversionError(f"device must be cpu or cuda, got {device!r}") from exc
    if kind not in ("cpu", "cuda") or (kind == "cuda" and not torch.cuda.is_available()):
        raise ConversionError(f"device {device!r} is not available here (torch sees "
                              f"{torch.cuda.device_count()} CUDA devices)")
    threads_before = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    split = ExpertSplit()
    try:
        with torch.no_grad():
            compute = torch.device(split.device(device))
            if not split.is_leader:
                split.serve(_expert_learner(SourceCheckpoint(Path(src)), IntProducts(device=compute)))
                return {}
            return _convert(Path(src), Path(dst), fmt, learn, calib, tokenizer, calib_sequences, calib_seq_len,
                            clip_settings or ClipSearchSettings(), resume,
                            tuple(DEFAULT_KEEP_BF16 if keep_bf16 is None else keep_bf16), max_shard_bytes,
                            batch_size, progress, _fail_after_shards, quant_method, split, compute)
    finally:
        split.finish()
        torch.set_num_threads(threads_before)


def _expert_learner(source: SourceCheckpoint, products: IntProducts) -> LearnOne:
    """``learn_one`` of :mod:`w4a8moe.convert.distributed` for this source and device."""
    def learn_one(layer: int, expert: int, rows: torch.Tensor, settings: ClipSearchSettings,
                  weights: dict[str, torch.Tensor] | None) -> ExpertClips:
        w = weights if weights is not None else source.load_expert(layer, expert)
        return learn_expert_clips(rows, ExpertWeights(w["gate"], w["up"], w["down"]), settings, products)

    return learn_one


def _glibc_malloc_trim():
    """glibc's ``malloc_trim``, or ``None`` off glibc."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_MALLOC_TRIM = _glibc_malloc_trim()


def release_free_heap() -> bool:
    """Return the heap's free pages to the system (glibc ``malloc_trim(0)``), after each expert.

    glibc raises its mmap threshold to the size of each mapped block freed (up to 32 MiB),
    after which the converter's per-expert temporaries of 4-32 MB (int8 values, packed
    weights) come from the heap, where free gaps stay counted as resident: at DeepSeek-V3
    expert shapes a round-to-nearest MoE layer's peak anonymous memory grew by 170 MiB from 16
    to 64 experts (+11 %). Trimming keeps the threshold (fixing it at 4 MiB bounded the memory
    too but cost 0.7 s per learned expert in page faults). Returns whether memory was released."""
    return bool(_MALLOC_TRIM(0)) if _MALLOC_TRIM is not None else False


def _convert(src: Path, dst: Path, fmt: CheckpointFormat, learn: bool, calib, tokenizer, calib_sequences: int,
             calib_seq_len: int, clip_settings: ClipSearchSettings, resume: bool, keep_bf16: tuple[str, ...],
             max_shard_bytes: int, batch_size: int, progress: bool, fail_after_shards: int | None,
             quant_method: str | None, split: ExpertSplit, device: torch.device) -> dict:
    t_start = time.perf_counter()
    source = SourceCheckpoint(src)
    mc = source.model_config
    names = mc.names
    policy = LayerPolicy(mc, keep_bf16)
    dtype = source.compute_dtype()
    if learn and not fmt.carries_activation_clip:
        # The format has no alpha tensor: an activation clip learned here would be lost.
        clip_settings = ClipSearchSettings(**{**asdict(clip_settings), "learn_alpha": False})

    ids, calib_info = (None, None)
    if learn:
        ids, calib_info = calibration_tokens(source, calib, tokenizer, calib_sequences, calib_seq_len)

    settings = {
        "converter_version": _converter_version(clip_settings if learn else None),
        "format": fmt.name,
        "learn": learn,
        "clip_search": _clip_search_identity(clip_settings) if learn else None,
        "calibration": calib_info,
        "keep_bf16": list(keep_bf16),
        "max_shard_bytes": max_shard_bytes,
        "batch_size": batch_size,
        "source": _source_identity(source),
        "source_fp8_block": list(source.fp8_block) if source.fp8_block else None,
    }
    if quant_method not in (None, fmt.default_quant_method):
        settings["quant_method"] = quant_method  # only when not the default: default runs keep their hash
    if learn and device.type != "cpu":
        # Float steps of the search may round differently there: no resume across device kinds.
        settings["calibration_device"] = device.type
    settings_hash = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]

    # Units of work: the non-layer tensors, then each decoder layer in order.
    groups = source.layer_names()
    units: list[tuple[str, int | None, list[str]]] = [(HEAD_UNIT, None, groups.get(None, []))]
    units += [(f"layer_{layer}", layer, groups[layer]) for layer in sorted(k for k in groups if k is not None)]
    has_experts = {layer: any(policy.expert_of(n) for n in unit_names) for _, layer, unit_names in units
                   if layer is not None}
    missing = [layer for layer in mc.expected_moe_layers if not has_experts.get(layer)]
    if missing:
        raise ConversionError(
            f"config.json makes layers {missing} MoE layers, but the source has no routed expert tensors there "
            f"(e.g. {names.expert_weight(missing[0], 0, 'down')}.weight is missing)"
        )
    w4a8_layers = [layer for layer, e in has_experts.items() if policy.w4a8_layer(layer, e)]
    if not w4a8_layers:
        raise ConversionError(f"{src}: no routed expert weights found (looked for "
                              f"'model.layers.L.{names.block}.{names.experts}.E.{names.expert_proj[2]}.weight')")
    for layer in w4a8_layers:
        source.check_moe_layer(layer)

    manifest = ProgressManifest(dst, settings_hash)
    if resume and (finished := _finished_report(dst, manifest, settings_hash, source, t_start)) is not None:
        manifest.clean_finished()  # killed while removing its progress record: nothing left to do
        return finished
    state = manifest.load_for_resume(f"{fmt.weights_prefix}-*.safetensors") if resume else None
    if not resume:
        manifest.start_fresh()

    out_config = dict(source.config)
    out_config.pop("quantization_config", None)
    out_config[CONFIG_KEY] = {
        "producer": "w4a8moe convert",
        "converter_version": settings["converter_version"],
        "format": fmt.name,
        "policy": policy.describe(),
        "w4a8_moe_layers": w4a8_layers,
        "learned_clips": learn,
        "activation_clip": fmt.carries_activation_clip,
        "clip_search": settings["clip_search"],
        "calibration": calib_info,
        "source_dtype": "fp8 (block " + "x".join(map(str, source.fp8_block)) + ")" if source.is_fp8 else str(dtype).replace("torch.", ""),
        "settings_hash": settings_hash,
    }
    run = _Run()
    run.unit_keys = [key for key, _, _ in units]

    def save_progress() -> None:
        done_reports = {k: v for k, v in run.reports.items() if run.unit_keys.index(k) < run.unit}
        run.hidden_saved_for = manifest.save(
            weight_map=writer.shards.weight_map, total_bytes=writer.shards.total_bytes, types=writer.types,
            ignore=writer.ignore, resume_unit=run.unit, reports=done_reports,
            hidden=run.hidden if (learn and run.unit < len(units)) else None, hidden_unit=run.hidden_saved_for,
        )

    def on_flush(fname: str, flushed: list[str]) -> None:
        run.shards_written += 1
        save_progress()
        if progress:
            tqdm.write(f"  wrote {fname} ({len(flushed)} tensors)")
        if fail_after_shards is not None and run.shards_written >= fail_after_shards:
            raise RuntimeError(f"injected failure after {run.shards_written} shard(s) (testing)")

    writer = CheckpointWriter(dst, out_config, fmt, activation_use_clip=fmt.carries_activation_clip,
                              max_shard_bytes=max_shard_bytes, on_flush=on_flush, quant_method=quant_method)
    first_unit = 0
    if state is not None:
        writer.restore(state["weight_map"], state["total_bytes"], state["types"], state["ignore"])
        first_unit = int(state["resume_unit"])
        run.reports = dict(state["reports"])

    runner = LayerRunner(source, dtype, batch_size, device) if learn else None
    learner = _expert_learner(source, IntProducts(device=device)) if learn else None

    def learn_layer(layer: int, moe_input: torch.Tensor, routed_rows: list[torch.Tensor]) -> ClipsOf:
        return split.learn_layer(layer, moe_input, routed_rows, clip_settings, learner)

    if learn and first_unit < len(units):
        run.hidden = manifest.hidden(state) if state is not None else None
        if run.hidden is None and first_unit <= 1:
            run.hidden = runner.embed(ids)
        if run.hidden is None:
            raise ConversionError(f"{dst}: the progress manifest has no saved hidden states; cannot resume")
        run.hidden_saved_for = first_unit if state is not None and state.get("hidden_file") else None

    hidden_bytes = 0 if ids is None else ids.numel() * mc.hidden_size * torch.empty((), dtype=dtype).element_size()
    # One bar over the source bytes (units are layers), one per MoE layer over its experts, a
    # line per output shard.
    unit_bytes = [source.source_bytes_of(n) for _, _, n in units]
    bar = tqdm(total=sum(unit_bytes), initial=sum(unit_bytes[:first_unit]), desc="convert", unit="B",
               unit_scale=True, disable=not progress)
    for index in range(first_unit, len(units)):
        key, layer, unit_names = units[index]
        run.unit = index
        bar.set_postfix_str(key)
        entry, next_hidden = _convert_unit(source, policy, writer, runner, run.hidden, layer, unit_names, fmt,
                                           layer in w4a8_layers, learn, learn_layer, progress)
        run.reports[key] = entry
        # Unmap the source shards: pages read for this unit should not stay resident.
        source.reader.close()
        if next_hidden is not None:
            run.hidden = next_hidden
        bar.update(unit_bytes[index])
    bar.close()
    run.unit = len(units)
    if writer.flush() is None:
        save_progress()  # every shard is in place: a resume only writes the metadata files
    copy_files = source.non_weight_files()
    writer.finish(copy_files, description_metadata={"settings_hash": settings_hash})

    report = {
        "source_model_type": mc.model_type,
        "format": fmt.name,
        "learned_clips": learn,
        "settings_hash": settings_hash,
        "calibration": calib_info,
        "policy": policy.describe(),
        "w4a8_moe_layers": w4a8_layers,
        "units": {k: run.reports[k] for k in run.unit_keys},
        "copied_files": [p.name for p in copy_files],
    }
    atomic_write_json(dst / REPORT_FILE, report)
    manifest.remove()
    seconds = time.perf_counter() - t_start
    source_bytes = source.file_bytes()
    report["timing"] = {
        "seconds": seconds,
        "source_bytes": source_bytes,
        "source_mb_per_s": source_bytes / 1e6 / seconds if seconds > 0 else None,
        "resumed_from_unit": first_unit if state is not None else None,
    }
    report["memory"] = {
        "peak_rss_bytes": _peak_rss_bytes(),
        "largest_source_shard_bytes": source.largest_shard_bytes(),
        "largest_unit_source_bytes": max(source.source_bytes_of(n) for _, _, n in units),
        "calibration_hidden_bytes": hidden_bytes,
        "max_shard_bytes": max_shard_bytes,
    }
    return report


def _finished_report(dst: Path, manifest: ProgressManifest, settings_hash: str, source: SourceCheckpoint,
                     t_start: float) -> dict | None:
    """The report of a conversion with these settings that finished in ``dst`` (no progress record
    left): resuming it has nothing to do."""
    if manifest.path.exists() or not (dst / REPORT_FILE).exists():
        return None
    try:
        report = json.loads((dst / REPORT_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(report, dict) or report.get("settings_hash") != settings_hash:
        return None
    try:
        open_checkpoint(dst, validate="structure")
    except CheckpointError as exc:
        raise ConversionError(f"{dst}: holds this conversion, finished, but its files are damaged ({exc}); "
                              "convert again into an empty folder") from exc
    seconds, source_bytes = time.perf_counter() - t_start, source.file_bytes()
    report["timing"] = {"seconds": seconds, "source_bytes": source_bytes, "source_mb_per_s": source_bytes / 1e6 / seconds,
                        "resumed_from_unit": "finished"}
    report["memory"] = {"peak_rss_bytes": _peak_rss_bytes()}
    return report


def _convert_unit(source: SourceCheckpoint, policy: LayerPolicy, writer: CheckpointWriter,
                  runner: LayerRunner | None, hidden: torch.Tensor | None, layer: int | None,
                  unit_names: list[str], fmt: CheckpointFormat, is_w4a8: bool, learn: bool,
                  learn_layer, progress: bool) -> tuple[dict, torch.Tensor | None]:
    """Quantize and queue one unit's tensors; return its report entry and the next hidden states."""
    mc = source.model_config
    names = mc.names
    entry: dict = {"source_tensors": len(unit_names), "source_bytes": source.source_bytes_of(unit_names)}
    next_hidden = None
    acts = None
    if learn and layer is not None and layer < mc.num_hidden_layers:
        next_hidden, acts = runner.run_layer(layer, hidden, capture_moe=is_w4a8)
    elif learn and layer is not None:
        entry["note"] = "beyond num_hidden_layers (e.g. an MTP layer): not run on calibration data, clips stay 1"

    block_names: set[str] = set()
    if is_w4a8:
        block_prefix = names.layer_prefix(layer) + "."
        block_names = {n for n in unit_names if n.startswith(block_prefix)}
        consumed = _consumed_block_names(source, layer)
        unexpected = sorted(block_names - consumed)
        if unexpected:
            raise ConversionError(
                f"source tensor {unexpected[0]!r} sits in MoE block of layer {layer} but is not part of the "
                f"{mc.model_type} MoE layout (router, experts, shared expert); a validated W4A8 checkpoint cannot hold it"
            )
        entry["moe"] = _stream_moe_layer(source, policy, writer, layer, acts if learn else None, learn_layer,
                                         progress)
    w8a8, kept = 0, 0
    for name in unit_names:
        if name in block_names:
            continue
        info = source.tensors[name]
        if policy.classify(name, len(info.shape)) == W8A8:
            writer.add_w8a8_linear(name, source.load_float(name))
            w8a8 += 1
        else:
            tensor = source.load(name)
            if info.scale_name is not None:
                tensor = tensor.to(torch.bfloat16)  # FP8 weight kept unquantized: bf16, as upstream
            writer.add_float(name, tensor)
            kept += 1
    entry["w8a8_linears"] = w8a8
    entry["kept_tensors"] = kept
    return entry, next_hidden


def _consumed_block_names(source: SourceCheckpoint, layer: int) -> set[str]:
    mc = source.model_config
    names = mc.names
    prefix = names.layer_prefix(layer)
    out = {f"{prefix}.{names.router}.weight"}
    if mc.routing.method == "noaux_tc":
        out.add(f"{prefix}.{names.router}.e_score_correction_bias")
    for e in range(mc.num_experts):
        for p in EXPERT_PROJECTIONS:
            out.add(names.expert_weight(layer, e, p) + ".weight")
    if mc.shared_intermediate_size:
        for p in EXPERT_PROJECTIONS:
            out.add(names.shared_weight(layer, p) + ".weight")
        if names.shared_gate:
            out.add(f"{prefix}.{names.shared_gate}.weight")
    return out


def _stream_moe_layer(source: SourceCheckpoint, policy: LayerPolicy, writer: CheckpointWriter, layer: int, acts,
                      learn_layer, progress: bool) -> dict:
    """Quantize one MoE block expert by expert (clips learned from ``acts`` when given, by
    ``learn_layer(layer, moe_input, routed_rows)``), queueing
    each expert's tensors as soon as it is done; return the block's report entry.

    Nothing the size of the layer is held: each expert's packed tensors go to the writer (and
    leave memory with its shard), the source pages read for an expert are unmapped after it,
    and the layer errors are accumulated per expert (:class:`StreamedMoEOutput`). Tensors are
    queued in the order of :func:`moe_layer_tensors`, so shards hold the same tensors as when
    the whole layer was built first.
    """
    mc = source.model_config
    names = mc.names
    fmt = writer.fmt
    prefix = names.layer_prefix(layer)
    router = source.load_float(f"{prefix}.{names.router}.weight", torch.bfloat16)
    correction = None
    if mc.routing.method == "noaux_tc":
        correction = source.load_float(f"{prefix}.{names.router}.e_score_correction_bias")
    shared = None
    shared_gate = None
    if mc.shared_intermediate_size:
        shared = {}
        for p in EXPERT_PROJECTIONS:
            base = names.shared_weight(layer, p)
            w = source.load_float(base + ".weight")
            # A shared expert matched by a keep-bf16 pattern stays float; otherwise W8A8 (upstream).
            shared[p] = (w.to(torch.bfloat16), None) if policy.kept_by_pattern(base) else quantize_int8_per_channel(w)
        if names.shared_gate:
            shared_gate = source.load_float(f"{prefix}.{names.shared_gate}.weight", torch.bfloat16)
    writer.add_all(moe_router_tensors(mc, layer, router, correction))

    e_total = mc.num_experts
    alpha = torch.ones(e_total, dtype=torch.float32)
    routed_rows: list[torch.Tensor] | None = None
    learned_out = rtn_out = None
    if acts is not None:
        logits = torch.nn.functional.linear(acts.moe_input.to(torch.float32), router.to(torch.float32))
        _, ids = select_experts(logits, mc.routing, correction)
        routed_rows = [torch.nonzero((ids == e).any(dim=-1)).reshape(-1) for e in range(e_total)]
        clips_of = learn_layer(layer, acts.moe_input, routed_rows)
        learned_out = StreamedMoEOutput(acts.moe_input, router, mc.routing, correction)
        rtn_out = StreamedMoEOutput(acts.moe_input, router, mc.routing, correction)

    experts_report = []
    bar = tqdm(range(e_total), desc=f"layer {layer} experts", leave=False, disable=not progress)
    for e in bar:
        w = source.load_expert(layer, e)
        if routed_rows is not None:
            clips: ExpertClips = clips_of(e, w)
            weight_clip, alpha[e] = clips.weight_clip, clips.alpha
            experts_report.append(clips.summary())
        else:
            clips, weight_clip = None, None
        if clips is not None and clips.quantized is not None:
            # GPTQ chose the integers under the clip-search scales.
            packed = {p: pack_int4_pairs(clips.quantized[p][0]) for p in EXPERT_PROJECTIONS}
            scale = {p: clips.quantized[p][1].to(torch.float32).reshape(-1) for p in EXPERT_PROJECTIONS}
        else:
            packed, scale = _rtn_expert(router, w, weight_clip)
        if learned_out is not None:
            learned_out.add_expert(e, packed, scale, alpha[e])
            rtn_out.add_expert(e, *_rtn_expert(router, w, None), 1.0)
        writer.add_all(moe_expert_tensors(fmt, mc, layer, e, packed, scale,
                                          alpha[e] if writer.activation_use_clip else None))
        del w, packed, scale
        source.release()
        release_free_heap()
    bar.close()
    writer.add_all(moe_shared_tensors(fmt, mc, layer, shared, shared_gate))
    entry: dict = {"experts": e_total}
    if acts is not None:
        reference = acts.moe_output.to(torch.float32).to(torch.float64)
        energy = float((reference ** 2).sum())

        def layer_err(out: StreamedMoEOutput) -> float | None:
            # The reference backend's bits: exact by construction and the same on every machine.
            y = out.finish(shared, shared_gate).to(torch.float64)
            return _rel(float(((y - reference) ** 2).sum()), energy)

        entry.update(
            calibration_tokens=int(acts.moe_input.shape[0]),
            layer_rel_err_rtn=layer_err(rtn_out),
            layer_rel_err_learned=layer_err(learned_out),
            expert_status={s: sum(1 for r in experts_report if r["status"] == s)
                           for s in sorted({r["status"] for r in experts_report})},
            per_expert=experts_report,
        )
    return entry


def _rtn_expert(router: torch.Tensor, w: dict[str, torch.Tensor], weight_clip: dict[str, torch.Tensor] | None
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One expert's packed int4 weights and scales, round-to-nearest under ``weight_clip`` (or none)."""
    q = quantize_moe_layer(FloatMoELayer(router, {p: w[p][None] for p in EXPERT_PROJECTIONS},
                                         weight_clip={p: c[None] for p, c in weight_clip.items()}
                                         if weight_clip else None))
    return {p: q.packed[p][0] for p in EXPERT_PROJECTIONS}, {p: q.scale[p][0] for p in EXPERT_PROJECTIONS}
