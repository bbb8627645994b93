"""Shared fixtures: tiny random models of several families, a tiny tokenizer, small text files."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from allocator.budget import Budget, Problem, build_problem
from allocator.inventory import Inventory
from allocator.levels import parse_grid
from allocator.search import SEARCHERS, Allocation, SearchContext, allocate, make_searcher

VOCAB = 256
WORDS = (
    "the model prunes weights of every layer under a budget while the search keeps the error low "
    "and the calibration text flows through each block of the network to measure sensitivity"
).split()


def tiny_config(family: str) -> transformers.PretrainedConfig:
    """A 2-block config of ``family`` small enough to run in milliseconds."""
    common = dict(vocab_size=VOCAB, num_hidden_layers=2, tie_word_embeddings=False)
    if family == "llama":
        return transformers.LlamaConfig(
            hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, **common
        )
    if family == "qwen3":
        return transformers.Qwen3Config(
            hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16, **common
        )
    if family == "gemma3":
        return transformers.Gemma3TextConfig(
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=16,
            **common,
        )
    attention = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    if family in MORE or family in MOE:
        return {**MORE, **MOE}[family](**attention, **common)
    if family == "gpt_neox":
        size = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2)
        return transformers.GPTNeoXConfig(**size, vocab_size=VOCAB, bos_token_id=1, eos_token_id=1)
    if family == "gpt2":
        return transformers.GPT2Config(
            n_embd=64, n_head=4, n_layer=2, n_positions=256, vocab_size=VOCAB, bos_token_id=1, eos_token_id=1
        )
    raise ValueError(family)


FAMILIES = ("llama", "qwen3", "gemma3", "gpt2")
# every dense decoder family users bring (issue 15); tests/test_families.py runs the full check list on each
MORE = {
    "qwen2": transformers.Qwen2Config,
    "mistral": transformers.MistralConfig,
    "gemma2": lambda **kw: transformers.Gemma2Config(head_dim=16, **kw),
    "phi3": lambda **kw: transformers.Phi3Config(pad_token_id=0, bos_token_id=1, eos_token_id=1, **kw),
    "olmo2": lambda **kw: transformers.Olmo2Config(pad_token_id=0, bos_token_id=1, eos_token_id=1, **kw),
}
# mixture-of-experts families: experts are fused 3-D parameters in transformers 5, not linears (issue 15, open)
MOE = {
    "mixtral": lambda **kw: transformers.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **kw),
    "qwen2_moe": lambda **kw: transformers.Qwen2MoeConfig(num_experts=4, num_experts_per_tok=2,
                                                          moe_intermediate_size=32,
                                                          shared_expert_intermediate_size=64, **kw),
    "olmoe": lambda **kw: transformers.OlmoeConfig(num_experts=4, num_experts_per_tok=2, pad_token_id=0,
                                                   bos_token_id=1, eos_token_id=1, **kw),
}  # fmt: skip
ALL_FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "olmo2", "gpt_neox", "gpt2")


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A random tiny causal LM of ``family`` in eval mode."""
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32).eval()


@pytest.fixture(params=FAMILIES)
def family_model(request) -> tuple[str, torch.nn.Module]:
    return request.param, tiny_model(request.param)


def text_lines(n_lines: int, seed: int) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    lines = []
    for _ in range(n_lines):
        length = int(torch.randint(5, 60, (1,), generator=gen))
        lines.append(" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (length,), generator=gen)))
    return lines


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A word-level tokenizer over WORDS (fast tokenizer, no download)."""
    return word_tokenizer()


def word_tokenizer():
    """A word-level tokenizer over WORDS (fast tokenizer, no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(dict.fromkeys(WORDS))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


@pytest.fixture(scope="session")
def bos_tokenizer():
    """The same words, with a tokenizer that puts ``<bos>`` before text (as Llama-3 and Gemma tokenizers do)."""
    return bos_word_tokenizer()


def bos_word_tokenizer(adds_bos: bool = True):
    """WORDS with a ``<bos>`` token; ``adds_bos``: the tokenizer puts it before text (else it only knows it)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<eos>": 1, "<bos>": 2, **{w: i + 3 for i, w in enumerate(dict.fromkeys(WORDS))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", bos_token="<bos>"
    )


def repeated_sentences(n_words: int, seed: int) -> str:
    """Random 3-6 word sentences, each said twice: the second copy is predictable only from context."""
    import random

    rng, words, out = random.Random(seed), list(dict.fromkeys(WORDS)), []
    while len(out) < n_words:
        sentence = [rng.choice(words) for _ in range(rng.randint(3, 6))]
        out += sentence + sentence
    return " ".join(out)


@pytest.fixture
def text_files(tmp_path) -> dict[str, Path]:
    """A calibration text file (long documents) and an evaluation text file."""
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(text_lines(40, seed=1)) + "\n")
    evaluation = tmp_path / "eval.txt"
    evaluation.write_text("\n".join(text_lines(60, seed=2)) + "\n")
    return {"calib": calib, "eval": evaluation}


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tokenizer) -> Path:
    """A tiny Llama saved as a Hugging Face folder, with its tokenizer."""
    folder = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True, scope="session")
def repo_stays_clean():
    """Fail the run if tests leave new files in the repository (they must write under tmp_path)."""
    root = Path(__file__).resolve().parents[1]

    def status() -> str:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=all"], cwd=root, capture_output=True, text=True
        )
        return out.stdout if out.returncode == 0 else ""

    before = status()
    yield
    after = status()
    new = sorted(set(after.splitlines()) - set(before.splitlines()))
    assert not new, f"tests wrote into the repository: {new}"


# ---- fakes the search tests share -------------------------------------------------------------------
class ErrorFitness:
    """The summed profile error, exactly: a deterministic stand-in for the model whose optimum is known."""

    pool_size, seq_len = 8, 32

    def __init__(self, problem: Problem):
        self.problem = problem

    def set_parent(self, choice):
        pass

    def __call__(self, choice, batch):
        return self.problem.total_sensitivity(choice)


class ToyFitness:
    """A deterministic stand-in for the model: summed error plus a batch-dependent wobble."""

    pool_size, seq_len = 16, 64

    def __init__(self, problem: Problem, fail_after: int | None = None):
        self.problem, self.calls, self.fail_after = problem, 0, fail_after

    def set_parent(self, choice):
        pass

    def __call__(self, choice, batch):
        self.calls += 1
        if hasattr(self, "counters"):
            self.counters["block_forwards"] += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt  # the search is killed mid-generation
        rows = np.arange(len(choice))
        wobble = 0.01 * np.sin(batch.sum() + choice.sum())
        return float(self.problem.sensitivity[rows, choice].sum() + wobble)


def toy_problem() -> Problem:
    """The tiny Llama's layers at a 0.1-step sparsity grid, with a made-up error that grows with sparsity."""
    inv = Inventory.from_model(tiny_model("llama"))
    grid = parse_grid("0:0.9:0.1")
    problem = build_problem(inv, grid, Budget.parse("sparsity=0.5"))
    rng = np.random.default_rng(0)
    s = np.array([lv.sparsity for lv in grid])
    return problem.with_sensitivity(rng.uniform(0.2, 3.0, size=(len(problem.units), 1)) * s[None, :] ** 2)


def search(method: str, problem: Problem, seed: int = 0, fitness=None, workdir=None, resume: bool = False,
           **options) -> Allocation:  # fmt: skip
    """``allocate`` with the method made from ``options``: what the pipeline does, without a model."""
    return allocate(problem, make_searcher(method, **options), SearchContext(seed, fitness, workdir, resume))


class SlowToyFitness(ToyFitness):
    """The toy fitness, slow enough that two workers interleave (or that a kill lands inside a trial)."""

    def __init__(self, problem: Problem, delay: float = 0.01):
        super().__init__(problem)
        self.delay = delay

    def __call__(self, choice, batch):
        time.sleep(self.delay)
        return super().__call__(choice, batch)


# ---- the contract every searcher keeps (a test's own toy searcher is held to it too) -----------------
CONTRACT_OPTIONS = {"evolution": {"generations": 5, "offspring": 4, "stages": "2@32,1@64"},
                    "guided": {"generations": 5, "offspring": 4}, "optuna": {"trials": 8}}  # fmt: skip


def contract_problem(target: str) -> Problem:
    """The tiny Llama under ``target`` with a made-up profile that grows with compression, and outlier ratios."""
    inv = Inventory.from_model(tiny_model("llama"))
    grid = parse_grid("0:0.9:0.05" if target.startswith("sparsity") else "dense,w8,w4g32,w3g32,w2g32")
    problem = build_problem(inv, grid, Budget.parse(target))
    rng = np.random.default_rng(0)
    level_strength = np.array(
        [lv.sparsity + (16 - (lv.weights.value_bits if lv.quantized else 16)) / 16 for lv in grid]
    )
    error = (level_strength[None, :] ** 2) * rng.uniform(0.5, 2.0, size=(len(problem.units), 1))
    return problem.with_sensitivity(error, rng.uniform(0.01, 0.05, size=len(problem.units)))


def check_searcher_contract(method: str, target: str, options: dict) -> None:
    """Through ``allocate``: the budget kept, the same seed gives the same plan, the problem left unchanged,
    and a method that minimises the proxy (needs a fitness or a profile) is no worse than uniform on it."""
    problem = contract_problem(target)
    before = problem.sensitivity.copy()
    a = search(method, problem, 0, ErrorFitness(problem), **options)
    b = search(method, problem, 0, ErrorFitness(problem), **options)
    assert problem.feasible(a.choice) and np.array_equal(a.choice, b.choice)
    assert np.array_equal(problem.sensitivity, before)
    uniform = search("uniform", problem, 0).choice
    if make_searcher(method, **options).needs() & {"fitness"} or method == "knapsack":
        assert problem.total_sensitivity(a.choice) <= problem.total_sensitivity(uniform) + 1e-12


def check_options_declared(method: str) -> None:
    """Each option has help, a type its default has (or None), a default among its choices, and a flag."""
    from allocator.cli import build_parser

    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices["run"].format_help().split())
    for f in SEARCHERS[method].options():
        kind = f.metadata["kind"]
        assert f.metadata["help"] and (f.default is None or isinstance(f.default, kind)), f.name
        assert f.metadata["choices"] is None or f.default in f.metadata["choices"], f.name
        assert "--" + f.name.replace("_", "-") in help_text, f.name
