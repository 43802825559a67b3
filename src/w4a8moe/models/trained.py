"""A small, really trained DeepSeek-V3-architecture model: the project's test subject.

Random weights have no activation outliers and no learned routing, so they say little about
quantization error. This module trains a few-million-parameter ``DeepseekV3ForCausalLM``
(MLA attention, one dense layer then MoE layers with ``noaux_tc`` group-limited routing,
a shared expert, byte vocabulary) on the built-in Shakespeare ``train`` split for a few CPU
minutes and saves it as an ordinary Hugging Face checkpoint (bf16 safetensors with the
per-expert tensor layout ``model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight``), with a
byte-level tokenizer that maps each UTF-8 byte to the token of the same id.

The routing correction bias ``e_score_correction_bias`` gets no gradient in DeepSeek-V3; it is
updated here the auxiliary-loss-free way (after each step, ``bias_e += rate * sign(mean_load -
load_e)``), so it is non-zero and balances expert load as in the real model.

Nothing is downloaded. Training is seeded and runs with torch's deterministic algorithms: the
same arguments, torch version and thread count give bit-identical weights (different thread
counts sum in different orders, so their weights differ in the last bits).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from w4a8moe.data import ByteTokenizer, load_text

CACHE_ENV = "W4A8MOE_CACHE_DIR"
"""Environment variable naming the cache folder (default ``~/.cache/w4a8moe``)."""
TINY_MODEL_NAME = "tiny-deepseek-v3-shakespeare-v1"
"""Folder name of the cached trained model; bump the suffix when the recipe changes."""
TRAIN_REPORT_FILE = "w4a8moe_training.json"
"""Written next to the weights: recipe, losses and timing of the training run."""

DEFAULT_STEPS = 500
DEFAULT_BATCH_SIZE = 24
DEFAULT_SEQ_LEN = 128


def tiny_trained_config(**overrides) -> dict:
    """The ``config.json`` dict of the trained test model (DeepSeek-V3 architecture, ~3.5M params).

    4 layers (layer 0 dense, layers 1-3 MoE), hidden 256, 16 routed experts in 4 groups, top-4
    from the best 2 groups, one shared expert, MLA with ``kv_lora_rank`` 64, vocabulary 256.
    """
    config = {
        "model_type": "deepseek_v3",
        "architectures": ["DeepseekV3ForCausalLM"],
        "vocab_size": 256,
        "hidden_size": 256,
        "intermediate_size": 512,
        "moe_intermediate_size": 64,
        "num_hidden_layers": 4,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "n_routed_experts": 16,
        "n_shared_experts": 1,
        "num_experts_per_tok": 4,
        "n_group": 4,
        "topk_group": 2,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "q_lora_rank": None,
        "kv_lora_rank": 64,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "v_head_dim": 32,
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "num_nextn_predict_layers": 0,
        "bos_token_id": None,
        "eos_token_id": 0,
        "pad_token_id": 0,
    }
    config.update(overrides)
    return config


# ---------------------------------------------------------------------------- tokenizer
def _byte_to_unicode() -> dict[int, str]:
    """The GPT-2 byte-level alphabet: a printable character for each byte value.

    The ``tokenizers`` ByteLevel pre-tokenizer and decoder use exactly this table, so a BPE
    model whose vocabulary is these 256 characters (no merges) encodes text to its UTF-8 bytes.
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def write_byte_tokenizer(directory: str | Path) -> None:
    """Write ``tokenizer.json`` + ``tokenizer_config.json``: token id == UTF-8 byte value.

    Loadable with ``transformers.AutoTokenizer`` (as a ``PreTrainedTokenizerFast``), so that
    generation and lm-eval treat the model like any other. Byte 0 (never in text) serves as the
    end-of-text and padding token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    table = _byte_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    directory = Path(directory)
    tok.save(str(directory / "tokenizer.json"))
    eos = table[0]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eos,
        "pad_token": eos,
        "model_max_length": 1024,
        "clean_up_tokenization_spaces": False,
        "w4a8moe_byte_tokenizer": True,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


# ---------------------------------------------------------------------------- training
def _random_windows(ids: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """``batch`` random windows of ``seq_len + 1`` tokens (inputs plus the shifted labels)."""
    starts = torch.randint(0, ids.numel() - seq_len - 1, (batch,), generator=gen)
    return torch.stack([ids[s : s + seq_len + 1] for s in starts.tolist()])


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, ids: torch.Tensor, seq_len: int, num_sequences: int) -> float:
    """Mean next-token cross-entropy (nats) over the first ``num_sequences`` consecutive windows."""
    windows = ids[: num_sequences * seq_len].reshape(num_sequences, seq_len)
    total, count = 0.0, 0
    for chunk in windows.split(16):
        out = model(input_ids=chunk, labels=chunk)
        n = chunk.numel() - chunk.shape[0]
        total += float(out.loss) * n
        count += n
    return total / count


def _moe_gates(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]


def train_tiny_model(
    out_dir: str | Path,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seq_len: int = DEFAULT_SEQ_LEN,
    lr: float = 3e-3,
    bias_update_rate: float = 1e-3,
    config_overrides: dict | None = None,
    num_threads: int | None = None,
    log_every: int = 50,
    verbose: bool = True,
) -> Path:
    """Train the tiny DeepSeek-V3 model on the ``train`` split and save it to ``out_dir``.

    AdamW with linear warm-up and cosine decay, gradient clipping at 1, fp32 training; the
    saved weights are bf16 (the router correction bias stays fp32, as DeepSeek ships it).
    ``out_dir`` receives ``config.json``, ``model.safetensors`` (per-expert names), the byte
    tokenizer and ``w4a8moe_training.json`` (recipe, train/held-out loss, seconds).
    Deterministic for a given torch build and thread count (recorded in the report).
    Returns ``out_dir``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    threads_before = torch.get_num_threads()
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    # The multi-threaded CPU backward of the experts' index_add is otherwise order-dependent.
    torch.use_deterministic_algorithms(True)
    try:
        return _train(out_dir, steps, seed, batch_size, seq_len, lr, bias_update_rate, config_overrides,
                      log_every, verbose)
    finally:
        torch.use_deterministic_algorithms(deterministic_before)
        torch.set_num_threads(threads_before)


def _train(out_dir: Path, steps: int, seed: int, batch_size: int, seq_len: int, lr: float,
           bias_update_rate: float, config_overrides: dict | None, log_every: int, verbose: bool) -> Path:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    tokenizer = ByteTokenizer()
    train_ids = tokenizer.encode(load_text("train"))
    heldout_ids = tokenizer.encode(load_text("heldout"))

    config_dict = tiny_trained_config(**(config_overrides or {}))
    hf_config = DeepseekV3Config(**{k: v for k, v in config_dict.items() if k not in ("model_type", "architectures")})
    hf_config.architectures = ["DeepseekV3ForCausalLM"]
    model = DeepseekV3ForCausalLM(hf_config).to(torch.float32)
    model.train()
    num_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, min(50, steps // 10))

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    # Expert load per MoE layer, read from the router's chosen ids (third output).
    loads: dict[int, torch.Tensor] = {}
    gates = _moe_gates(model)

    def record_load(index: int):
        def hook(module, inputs, output):
            ids = output[2].reshape(-1)
            loads[index] = torch.bincount(ids, minlength=module.num_experts).to(torch.float32)

        return hook

    handles = [gate.register_forward_hook(record_load(i)) for i, gate in enumerate(gates)]
    start = time.perf_counter()
    losses: list[float] = []
    try:
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            batch = _random_windows(train_ids, batch_size, seq_len, gen)
            out = model(input_ids=batch[:, :-1], labels=batch[:, 1:].contiguous(), shift_labels=batch[:, 1:].contiguous())
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                # Auxiliary-loss-free balancing (DeepSeek-V3): push under-used experts up.
                for i, gate in enumerate(gates):
                    load = loads[i]
                    gate.e_score_correction_bias += bias_update_rate * torch.sign(load.mean() - load)
            losses.append(out.loss.item())
            if verbose and (step % log_every == 0 or step == steps - 1):
                recent = sum(losses[-log_every:]) / len(losses[-log_every:])
                print(f"  step {step:5d}/{steps}  loss {recent:.3f}  lr {lr_at(step):.2e}  "
                      f"{time.perf_counter() - start:6.1f}s", flush=True)
    finally:
        for handle in handles:
            handle.remove()
    train_seconds = time.perf_counter() - start
    model.eval()
    heldout_loss = evaluate_loss(model, heldout_ids, seq_len, 64)
    train_eval_loss = evaluate_loss(model, train_ids[len(train_ids) // 2 :], seq_len, 64)

    # Save in bf16 like real releases; the correction bias stays fp32.
    biases = {i: g.e_score_correction_bias.detach().clone() for i, g in enumerate(gates)}
    model.to(torch.bfloat16)
    for i, gate in enumerate(gates):
        gate.e_score_correction_bias.data = biases[i]
    model.config.dtype = "bfloat16"
    model.save_pretrained(out_dir, safe_serialization=True)
    write_byte_tokenizer(out_dir)
    report = {
        "recipe": TINY_MODEL_NAME,
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "lr": lr,
        "bias_update_rate": bias_update_rate,
        "num_parameters": num_params,
        "train_tokens": steps * batch_size * seq_len,
        "train_seconds": round(train_seconds, 1),
        "threads": torch.get_num_threads(),
        "final_train_batch_loss": sum(losses[-20:]) / len(losses[-20:]),
        "train_loss_fp32": train_eval_loss,
        "heldout_loss_fp32": heldout_loss,
        "heldout_bits_per_byte_fp32": heldout_loss / math.log(2),
    }
    (out_dir / TRAIN_REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    _check_per_expert_layout(out_dir, config_dict)
    if verbose:
        print(f"  trained {num_params / 1e6:.2f}M parameters in {train_seconds:.0f}s: "
              f"train loss {train_eval_loss:.3f}, held-out loss {heldout_loss:.3f} nats/byte")
    return out_dir


def _check_per_expert_layout(directory: Path, config: dict) -> None:
    """Fail loudly if the saved weights do not use per-expert tensor names.

    transformers 5 keeps experts fused in memory (``experts.gate_up_proj``) and splits them
    back to the per-expert layout on save; the converter and the checkpoint formats need the
    latter, so a change of that behaviour must not go unnoticed.
    """
    from w4a8moe.formats.safetensors_io import read_safetensors_header

    names: set[str] = set()
    for shard in directory.glob("*.safetensors"):
        names.update(read_safetensors_header(shard))
    layer = int(config["first_k_dense_replace"])
    expected = f"model.layers.{layer}.mlp.experts.0.gate_proj.weight"
    if expected not in names:
        fused = sorted(n for n in names if ".experts." in n)[:3]
        raise RuntimeError(f"saved model lacks per-expert tensor {expected!r}; found expert tensors {fused}")


def default_cache_dir() -> Path:
    """``$W4A8MOE_CACHE_DIR`` or ``~/.cache/w4a8moe``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "w4a8moe"


def tiny_trained_model_dir(cache_dir: str | Path | None = None, verbose: bool = True) -> Path:
    """The cached trained test model's folder, training it (a few CPU minutes) on first use.

    Training runs in a temporary folder next to the target and is renamed into place, so an
    interrupted run leaves nothing half-written and concurrent callers never see a partial
    model (if two train at once, the first rename wins and the other copy is discarded).
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / TINY_MODEL_NAME
    if (target / TRAIN_REPORT_FILE).exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    if verbose:
        print(f"training the tiny DeepSeek-V3 test model into {target} (first use; a few minutes)", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{TINY_MODEL_NAME}.", dir=root))
    tmp.chmod(0o755)  # mkdtemp makes it private; the renamed model folder should not be
    try:
        train_tiny_model(tmp, verbose=verbose)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / TRAIN_REPORT_FILE).exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
