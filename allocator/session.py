"""A loaded model with its data windows and dense reference, ready to compress and evaluate many plans.

One session serves many plans: the pipeline's single run, ``allocator compare`` and the benchmarks that
compare methods on the same model and data in one process. What it measures once and keeps (profiles,
level databases, dense references) lives in its :class:`~allocator.workspace.Workspace`.
"""

from __future__ import annotations

import logging
import math
import time
from functools import cached_property

import numpy as np
import torch

from allocator import data
from allocator.backends import apply_, get_backend
from allocator.backends.activations import clear_activations_, needs_state, set_activations_
from allocator.backends.database import LevelDatabase
from allocator.budget import achieved
from allocator.evaluate import kl_divergence, window_nll
from allocator.inventory import Inventory, weight_view
from allocator.levels import Level
from allocator.levels.quantizer import Params
from allocator.model import DTYPES, LoadedModel, load_model
from allocator.profile import Profile, input_stats, outlier_ratios
from allocator.spec import RunConfig, device_defaults
from allocator.workspace import Calibration, Workspace

log = logging.getLogger(__name__)


class Session:
    """A loaded model with its data and dense reference, ready to compress and evaluate many plans.

    ``config`` must have been checked by :func:`allocator.spec.resolve`. The dense perplexity and the KL teacher
    are computed once, when first needed; :meth:`evaluate` restores the original weights before each plan.
    """

    def __init__(self, config: RunConfig, loaded: LoadedModel | None = None) -> None:
        """``loaded``: a model already in memory (a benchmark's random model built from a config) instead of
        ``config.model``."""
        config = device_defaults(config)
        calib_records = data.load_records(config.calib or data.default_calibration())
        eval_records = data.load_records(config.eval or data.default_evaluation())
        self.config = config
        self.workspace = Workspace(config.cache_dir)
        self.timings: dict[str, float] = {}
        t0 = time.perf_counter()
        self.loaded = loaded or load_model(config.model, DTYPES[config.dtype], config.device, self.workspace.root)
        self.model = self.loaded.model
        self.inventory = Inventory.from_model(self.model)
        self.timings["load_s"] = time.perf_counter() - t0
        tokenizer = self.loaded.tokenizer
        self.bos = data.bos_token_id(tokenizer)  # windows start with BOS where the tokenizer adds one
        self.eval_seqs = data.evaluation_sequences(
            tokenizer, eval_records, config.seq_len, config.eval_samples, self.bos
        )
        self.calib, self.kl_seqs = data.calibration_split(tokenizer, calib_records, config.seq_len,
                                                          config.calib_samples, config.kl_samples, config.seed,
                                                          self.bos)  # fmt: skip
        self.activation_state: dict[str, torch.Tensor] = {}  # calibrated input scales of the compressed model
        # the dense weights, kept in host memory (an 8B model's would take 15 GB of the GPU's)
        self._original = {
            n: {k: v.detach().to("cpu", copy=True) for k, v in self.model.get_submodule(n).named_parameters()}
            for n in self.inventory.shapes
        }

    @cached_property
    def dense(self) -> tuple[float, torch.Tensor]:
        """Dense perplexity and the KL teacher's log-probs: from the cache, or measured once, on first use."""
        self.restore_()
        t0 = time.perf_counter()
        cfg = self.config
        ref = self.workspace.dense(self.model, self.eval_seqs, self.kl_seqs, cfg.batch_size, cfg.dense_cache)
        self.timings["dense_eval_s"] = time.perf_counter() - t0
        self.dense_cached, self.dense_window_nll = ref.cached, ref.window_nll
        log.info("dense perplexity %.3f%s", ref.perplexity, " (cached)" if ref.cached else "")
        return ref.perplexity, ref.teacher

    @property
    def calib_meta(self) -> dict:
        """What the calibration windows are: profiles and databases are keyed by it."""
        cfg = self.config
        meta = {"calib": cfg.calib or "c4-validation-2k", "calib_samples": cfg.calib_samples,
                "seq_len": cfg.seq_len, "seed": cfg.seed}  # fmt: skip
        return {**meta, "bos": True} if self.bos is not None else meta  # no key without BOS: older names hold

    def calibration(self, windows: int | None = None) -> Calibration:
        """The dense model and the first ``windows`` calibration windows (all by default), for a measurement."""
        self.restore_()
        seqs = self.calib if windows is None else self.calib[:windows]
        dense = {n: weight_view(self.model.get_submodule(n), p["weight"]) for n, p in self._original.items()}
        return Calibration(self.model, self.inventory, self.loaded.model_id, seqs, self.calib_meta,
                           self.config.batch_size, dense)  # fmt: skip

    # ---- what searches need, measured once (the workspace keeps them) ---------------------------------
    def profile(self, levels: list[Level], backend: str, with_database: bool = False) -> Profile:
        """The sensitivity profile of ``levels`` (``--profile`` if the run named one)."""
        t0 = time.perf_counter()
        found = self.workspace.profile(self.calibration(), levels, backend, self.config.profile, with_database)
        self.timings["profile_s"] = time.perf_counter() - t0  # with the level database (0 where both are cached)
        return found

    def database(self, levels: list[Level], backend: str) -> LevelDatabase:
        """The level database of ``levels``."""
        return self.workspace.database(self.calibration(), levels, backend)

    def add_kl(self, found: Profile, levels: list[Level], backend: str, limit_s: float | None = None) -> bool:
        """The profile's ``kl`` column, measured on ``--fit-seqs`` windows if it lacks one (and, with ``limit_s``,
        if it takes no longer); whether the profile has it."""
        t0 = time.perf_counter()
        added = self.workspace.add_kl(self.calibration(), found, levels, backend, self.config.fit_seqs,
                                      limit_s=limit_s)  # fmt: skip
        self.timings["kl_profile_s"] = time.perf_counter() - t0
        return added

    @cached_property
    def input_stats(self) -> dict:
        """The layers' dense-input column norms and largest |x| on the calibration windows (one pass, kept)."""
        return input_stats(self.model, self.inventory, self.calibration().seqs, self.config.batch_size)

    def outlier_ratios(self, units: list[tuple[str, ...]]) -> np.ndarray:
        """OWL's outlier ratio for each unit ([U]), from the input statistics (no profile, no database)."""
        ratios = outlier_ratios(self.model, self.inventory, self.input_stats)
        return np.array([ratios[unit[0]] for unit in units], dtype=float)

    # ---- plans ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def restore_(self) -> None:
        """Put the dense weights and biases of every compressible layer back (and no activation quantization)."""
        clear_activations_(self.model)
        for name, params in self._original.items():
            module = self.model.get_submodule(name)
            for key, value in params.items():
                getattr(module, key).copy_(value)

    def find_database(self, levels: list[Level], backend: str) -> LevelDatabase | None:
        """The level database of ``levels`` if the workspace holds one (never built here); None with
        ``--sequential``, whose layers see other inputs than a database's."""
        if self.config.sequential:
            return None
        return self.workspace.find_database(self.calibration(), levels, backend)

    def compress_(self, assignment: dict[str, Level], backend: str,
                  database: LevelDatabase | None = None) -> dict[str, Params]:  # fmt: skip
        """Compress the dense model in place to ``assignment``; returns each quantized layer's grid parameters.

        From ``database`` when given (a decode per layer, no calibration pass), else by running ``backend``,
        each layer calibrated on the dense model's activations as the database holds it (or, with
        ``--sequential``, on the compressed blocks' outputs): the same weights either way. The dense reference
        is measured first if it is not yet (it needs the dense weights).
        """
        _ = self.dense
        self.restore_()
        chosen = get_backend(backend)
        t0 = time.perf_counter()
        record: dict[str, Params] = {}
        calibrated = needs_state(list(assignment.values()))
        if database is not None:
            database.load_into_(self.model, assignment)
            record = {n: g[1] for n, lv in assignment.items() if lv.quantized and (g := database.grid(n, lv))}
            self.activation_state = database.input_absmax if calibrated else {}
        else:
            calib = self.calib if chosen.needs_data else None
            light = chosen.needs_data and not chosen.hessian and not self.config.sequential  # Wanda: column norms
            # one pass a session: OWL's, or the first plan's, serves every later plan (compare: uniform, knapsack…)
            known = self.input_stats if calibrated or light else self.__dict__.get("input_stats")
            apply_(self.model, assignment, backend, calib, self.config.batch_size, self.config.sequential, record,
                   known)  # fmt: skip
            self.activation_state = {n: s.absmax for n, s in known.items()} if calibrated else {}
            set_activations_(self.model, assignment, self.activation_state)
        self.timings["compress_s"] = time.perf_counter() - t0
        return record

    def evaluate(self, assignment: dict[str, Level], backend: str, database: LevelDatabase | None = None) -> dict:
        """Compress the dense model to ``assignment`` with ``backend`` (from ``database`` if given) and measure it."""
        self.compress_(assignment, backend, database)
        return self.measure(assignment, backend)

    def measure(self, assignment: dict[str, Level], backend: str) -> dict:
        """Perplexity and KL to dense of the model as it is now (compressed to ``assignment``)."""
        dense_ppl, teacher = self.dense
        chosen = get_backend(backend)
        calib = self.calib if chosen.needs_data else None
        t0 = time.perf_counter()
        nll = window_nll(self.model, self.eval_seqs, self.config.batch_size, desc="compressed perplexity")
        kl = kl_divergence(self.model, self.kl_seqs, teacher, self.config.batch_size)
        return {
            "model": self.loaded.model_id,
            "backend": backend,
            "dense_perplexity": dense_ppl,
            "dense_cached": self.dense_cached,
            "bos_per_window": self.bos is not None,  # windows start with the tokenizer's BOS (not scored)
            "perplexity": math.exp(float(nll.mean())),
            "window_nll": nll.tolist(),  # per evaluation window: paired comparisons and intervals reuse it
            "kl_to_dense": kl,
            "achieved": achieved(assignment, self.inventory),
            "eval_tokens": int(self.eval_seqs.numel()),
            "kl_tokens": int(self.kl_seqs.numel()),
            "calibration_tokens": int(calib.numel()) if calib is not None else 0,
            "timings": {**self.timings, "eval_s": time.perf_counter() - t0},
        }
