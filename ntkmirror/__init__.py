"""ntkmirror: LoRA-free, forward-pass fine-tuning with signed log-gate controllers."""

from .compose import compose, inspect_controllers
from .controller import Controller
from .data import Example, load_jsonl_examples
from .dual import DualConfig, FitDualConfig, diagnose_many, dual_diagnose, fit_dual
from .errors import (AuthError, ConfigError, ControllerError, DataError, ModelLoadError, ModelMismatchError,
                     NotFound, NtkMirrorError, QuotaError, StoreError)
from .evaluate import evaluate, generate
from .fit import FitConfig, fit_controller, fit_controllers
from .gates import RowGates, attach, row_gates
from .models import load_model, model_fingerprint
from .secant import SecantConfig, secant_check
from .tuner import ForwardFineTuner

__version__ = "0.1.0"

__all__ = ["ForwardFineTuner", "load_jsonl_examples", "load_model", "Controller", "Example", "FitConfig",
           "fit_controller", "fit_controllers", "evaluate", "generate", "compose", "inspect_controllers",
           "RowGates", "row_gates", "attach", "model_fingerprint", "NtkMirrorError", "DataError", "ConfigError",
           "ControllerError", "ModelMismatchError", "ModelLoadError", "StoreError", "NotFound", "AuthError",
           "QuotaError", "DualConfig", "FitDualConfig", "SecantConfig", "dual_diagnose", "fit_dual", "secant_check",
           "diagnose_many"]
