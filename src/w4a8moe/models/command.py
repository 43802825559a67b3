"""``w4a8moe generate PATH --prompt TEXT``: stream text from a W4A8 checkpoint."""

from __future__ import annotations

import argparse
import codecs
import sys
from pathlib import Path

import torch

from w4a8moe.data import ByteTokenizer


class ByteStreamer:
    """A transformers streamer for the byte tokenizer: prints new bytes as UTF-8 as they come.

    Multi-byte characters are held back until complete (incremental decoder), so the
    terminal never shows half a character.
    """

    def __init__(self, out=None, skip_prompt: bool = True):
        self.out = out or sys.stdout
        self.skip_prompt = skip_prompt
        self._prompt_seen = False
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def put(self, value: torch.Tensor) -> None:
        if self.skip_prompt and not self._prompt_seen:
            self._prompt_seen = True
            return
        data = bytes(int(v) & 0xFF for v in value.reshape(-1).tolist())
        self.out.write(self._decoder.decode(data))
        self.out.flush()

    def end(self) -> None:
        self.out.write(self._decoder.decode(b"", final=True) + "\n")
        self.out.flush()


def generate_text(
    path: str | Path,
    prompt: str,
    max_new_tokens: int = 100,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    apply_alpha: bool = True,
    backend: str | None = None,
    stream: bool = True,
    model: torch.nn.Module | None = None,
    device: str = "cpu",
) -> str:
    """Generate a continuation of ``prompt`` with the W4A8 checkpoint at ``path``.

    Greedy when ``temperature`` is 0, else sampling (seeded). With ``stream`` the new text is
    printed as it is produced. ``model`` reuses an already loaded model (and its device);
    ``device`` (``"cpu"``, ``"cuda"``) is where a newly loaded one runs. Returns the new text.
    """
    from w4a8moe.models.loading import load_model, resolve_device
    from w4a8moe.models.tokenizer import load_tokenizer

    if model is None:
        resolve_device(device)  # before any reading: a missing GPU is the first thing to say
    tokenizer = load_tokenizer(path)
    if model is None:
        model = load_model(path, apply_alpha=apply_alpha, backend=backend, device=device)
    ids = tokenizer.encode(prompt).unsqueeze(0).to(model.get_input_embeddings().weight.device)
    if ids.numel() == 0:
        raise ValueError("the prompt is empty")
    streamer = None
    if stream:
        if isinstance(tokenizer, ByteTokenizer):
            streamer = ByteStreamer()
        else:
            from transformers import TextStreamer

            streamer = TextStreamer(tokenizer.hf, skip_prompt=True)
    kwargs = {"do_sample": temperature > 0}
    if temperature > 0:
        kwargs.update(temperature=temperature, top_k=top_k)
        torch.manual_seed(seed)
    eos = getattr(getattr(tokenizer, "hf", None), "eos_token_id", None)
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, streamer=streamer,
            pad_token_id=eos if eos is not None else 0, eos_token_id=eos, **kwargs,
        )
    return tokenizer.decode(out[0, ids.shape[1]:].cpu())


class GenerateCommand:
    """The ``generate`` subcommand (``add_arguments`` / ``run``, as the CLI expects)."""

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("path", help="a W4A8 checkpoint folder (either format)")
        parser.add_argument("--prompt", required=True, help="text to continue")
        parser.add_argument("--max-new-tokens", type=int, default=100)
        parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
        parser.add_argument("--top-k", type=int, default=None)
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--no-alpha", action="store_true", help="ignore activation clips (upstream sglang behaviour)")
        parser.add_argument("--backend", help="expert kernel backend (default: $W4A8MOE_BACKEND or the fastest)")
        parser.add_argument("--device", default="cpu", help="where the model runs: cpu (default), cuda, cuda:N")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        sys.stdout.write(args.prompt)
        sys.stdout.flush()
        generate_text(
            args.path, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed,
            apply_alpha=not args.no_alpha, backend=args.backend, stream=True, device=args.device,
        )
        return 0


generate = GenerateCommand()
