"""Stage 3 of training: the target's features and greedy labels at every position of the
self-distillation sequences, captured while answering (``Tap``) or by one lean-runner pass."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..config import ConfigError
from ..runners import LeanRunner, lean_model
from .common import progress, token_ids


class Tap:
    """Forward hooks on a Llama-family Hugging Face model that keep, at every forward pass, the
    outputs of decoder ``layers`` side by side (fp16; the last layer's before the final norm, as
    ``LeanRunner.features`` gives them) and the argmax of the logits it computes: the features and
    labels of ``extract_features``, taken while ``generate`` writes the answers instead of in a
    second pass over them."""

    def __init__(self, model, layers: tuple[int, ...]):
        self.model, self.layers = model, layers
        self.steps: list[tuple[torch.Tensor, torch.Tensor]] = []  # per pass: [B, T, k*H], [B, T']
        self._outputs: list[torch.Tensor] = []

    def __enter__(self):
        decoder = self.model.model.layers
        self._hooks = [decoder[i].register_forward_hook(self._layer) for i in self.layers]
        self._hooks.append(self.model.get_output_embeddings().register_forward_hook(self._logits))
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()

    def _layer(self, module, inputs, output):
        self._outputs.append((output[0] if isinstance(output, tuple) else output).to(torch.float16))

    def _logits(self, module, inputs, output):  # kept on the CPU, where training reads them from
        self.steps.append((torch.cat(self._outputs, dim=-1).cpu(), output.argmax(-1).cpu()))
        self._outputs = []

    def sequence(self, row: int, pad: int, prompt_len: int, answer_len: int, filler: int):
        """Features ``[n, k*H]`` and labels ``[n]`` of row ``row`` (``pad`` pad tokens on its left),
        ``n = prompt_len + answer_len``. Pass 0 covered the prompt; pass t covers answer token t-1
        and predicts answer token t. What no pass computed (labels inside the prompt, and the last
        token's feature and label when generation stopped right after it) is never read by
        training: it is left as zeros and ``filler``."""
        n = prompt_len + answer_len
        feats = torch.zeros(n, self.steps[0][0].shape[-1], dtype=torch.float16)
        labels = torch.full((n,), filler, dtype=torch.int32)
        feats[:prompt_len] = self.steps[0][0][row, pad:]
        for t, (f, lab) in enumerate(self.steps[: answer_len + 1]):
            if t:
                feats[prompt_len + t - 1] = f[row, -1]
            labels[prompt_len + t - 1] = lab[row, -1]
        return feats, labels


def _captured(parts: Path | None, records: list[dict]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Features and labels that ``generate_answers`` captured, by record index; a part that does
    not match its records (answers regenerated after a stop) is ignored."""
    got = {}
    for part in sorted(parts.glob("*.pt")) if parts is not None and parts.is_dir() else []:
        start = int(part.stem)
        for k, (ids, f, lab) in enumerate(torch.load(part), start):
            if k < len(records) and ids == token_ids(records[k]) and len(f) == len(ids):
                got[k] = (f, lab)
    return got


def extract_features(model, records: list[dict], path: Path, layers: tuple[int, ...], parts: Path | None = None):
    """Per sequence: features ``[L, len(layers) * H]`` (fp16; the outputs of decoder ``layers``
    side by side) and the target's greedy next token ``[L]`` (at least from the last prompt position
    on, where the head is trained). Those captured while the answers were written (``parts``) are
    taken as they are; the rest come from one lean-runner pass per sequence. Saved to ``path``; a
    round grown since (a larger ``--broad-prompts``, say) gets its new sequences appended."""
    data = torch.load(path) if path.is_file() else {"features": [], "labels": [], "tokens": []}
    have = len(data["tokens"])
    for k, (r, t) in enumerate(zip(records, data["tokens"])):
        if t.tolist() != token_ids(r):
            raise ConfigError("out", f"{path} does not hold the features of {path.parent}'s answers (sequence {k} "
                                     "differs); remove it to extract them again")
    if have >= len(records):
        return data
    captured = _captured(parts, records)
    runner = None
    bar = progress(len(records), f"features -> {path.name}", "seq")
    bar.update(have)
    for k, r in enumerate(records[have:], have):
        ids = token_ids(r)
        if k in captured:
            f, lab = captured[k]
        else:
            if runner is None:
                runner = LeanRunner(lean_model(model), capacity=512)
                runner.capture_layers(layers)
            runner.reset()
            logits = runner.forward(ids, num_logits=len(ids))
            f, lab = runner.features(0, len(ids)).to("cpu", torch.float16).clone(), logits.argmax(-1).to(torch.int32)
        data["features"].append(f)
        data["labels"].append(lab)
        data["tokens"].append(torch.tensor(ids, dtype=torch.int32))
        bar.update(1)
    bar.close()
    torch.save(data, path)
    if parts is not None and parts.is_dir():
        shutil.rmtree(parts)
    return data


