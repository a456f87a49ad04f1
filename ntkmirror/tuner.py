"""`ForwardFineTuner`: the seed's object API over fit / evaluate / generate / save / load.

The tuner keeps the model as a plain attribute (it is not an nn.Module), so the base model
is never a child module of a controller.
"""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path
from typing import Sequence

from .controller import Controller
from .data import Example, example_from_row
from .errors import ConfigError, ControllerError
from .evaluate import evaluate, generate
from .fit import FitConfig, fit_controller
from .gates import attach


def _examples(items) -> list[Example]:
    return [x if isinstance(x, Example) else example_from_row(x, where=f"example {i}") for i, x in enumerate(items)]


class ForwardFineTuner:
    """Fit, attach, save and load a signed log-gate controller on a frozen model.

        tuner = ForwardFineTuner(model, tokenizer, gates=5000)
        tuner.fit(load_jsonl_examples("train.jsonl"), steps=240)
        tuner.save("controller.safetensors")
        print(tuner.generate("Question: 47 + 36 = ?\\nAnswer:"))
    """

    def __init__(self, model, tokenizer, gates: int = FitConfig.gates, controller: Controller | None = None, **config):
        unknown = set(config) - {f.name for f in fields(FitConfig)}
        if unknown:
            raise ConfigError(f"unknown ForwardFineTuner option(s): {sorted(unknown)}")
        self.model, self.tokenizer = model, tokenizer
        self.config = FitConfig(gates=gates, **config)
        self.controller = controller.check_model(model, tokenizer=tokenizer) if controller is not None else None
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.requires_grad_(False)

    def fit(self, examples, steps: int | None = None, validation=None, progress: bool = True, **overrides) -> Controller:
        cfg = replace(self.config, **({"steps": steps} if steps is not None else {}), **overrides)
        self.controller = fit_controller(self.model, self.tokenizer, _examples(examples), cfg,
                                         _examples(validation) if validation else None, progress)
        return self.controller

    def _require(self) -> Controller:
        if self.controller is None:
            raise ControllerError("no controller: call fit() or load() first")
        return self.controller

    def save(self, path: str | Path) -> Path:
        return self._require().save(path)

    def load(self, path: str | Path, allow_model_mismatch: bool = False) -> Controller:
        self.controller = Controller.load(path).check_model(self.model, allow_model_mismatch, self.tokenizer)
        return self.controller

    def attached(self):
        """Context manager: the model runs with this controller inside the block."""
        return attach(self.model, self._require())

    def evaluate(self, examples, batch_size: int = 8, max_new_tokens: int | None = None,
                 exact: bool = True, base: bool = True) -> dict:
        """Metrics for the controller (and the base model, unless base=False) on the same examples."""
        exs = _examples(examples)
        kw = dict(batch_size=batch_size, max_length=self.config.max_length, max_new_tokens=max_new_tokens,
                  exact=exact, add_eos=self.config.add_eos)
        out = {"controller": evaluate(self.model, self.tokenizer, exs, self._require(), **kw)}
        if base:
            out["base"] = evaluate(self.model, self.tokenizer, exs, None, **kw)
        return out

    def generate(self, prompt: str | Sequence[str], max_new_tokens: int = 128, use_controller: bool = True,
                 **kw) -> str | list[str]:
        """Greedy continuation(s) of prompt(s), new text only."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        gates = self._require() if use_controller else None
        texts = generate(self.model, self.tokenizer, prompts, gates, max_new_tokens, **kw)
        return texts[0] if isinstance(prompt, str) else texts
