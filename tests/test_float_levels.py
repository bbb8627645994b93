"""FP8, NVFP4, MXFP4, MXFP8 weights and a8/afp8/anvfp4 activations round bit for bit as compressed-tensors (the
reference, imported here only): the weights, their scales, the tensors a checkpoint stores and what they cost."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.compressors.format import infer_module_format
from compressed_tensors.quantization import QuantizationStatus, preset_name_to_scheme
from compressed_tensors.quantization.lifecycle.forward import fake_quantize, forward_quantize
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam
from compressed_tensors.quantization.utils.fp4_utils import cast_to_fp4 as ct_cast_to_fp4

from allocator.backends import BACKENDS, compress_recorded
from allocator.backends.codec import decode, encode_layer
from allocator.backends.stats import LayerStats
from allocator.errors import AllocatorError
from allocator.formats import storage_bits, unfit
from allocator.levels import KINDS, Level, parse_level
from allocator.levels.acts import FP8Acts, Int8Acts, NVFP4Acts
from allocator.levels.floats import FP8, MXFP8
from allocator.levels.fp4 import MXFP4, NVFP4
from allocator.levels.numerics import cast_to_fp4, global_scale, mx_exponent, mx_scale

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
WEIGHTS = {"fp8": (FP8(), "FP8_DYNAMIC"), "fp8t": (FP8(True), "FP8"), "nvfp4": (NVFP4(), "NVFP4A16"),
           "mxfp4": (MXFP4(), "MXFP4A16"), "mxfp8": (MXFP8(), "MXFP8A16")}  # fmt: skip
ACTS = {"a8": (Int8Acts(), "W8A8"), "afp8": (FP8Acts(), "FP8_DYNAMIC"), "anvfp4": (NVFP4Acts(), "NVFP4")}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that -0.0 and +0.0 differ."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _weight(dtype: torch.dtype, rows: int = 32, cols: int = 128, seed: int = 0) -> torch.Tensor:
    """Random weights with a row of zeros, an outlier row, a row of tiny values and some -0.0."""
    W = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.02
    W[0] = 0
    W[1, 5] = 3.0
    W[2] *= 1e-3
    W[3, :7] = -0.0
    return W.to(dtype)


def _ct(W: torch.Tensor, preset: str, peak: torch.Tensor | None = None):
    """CT's fake-quantized weight, its scale and global scale, and the tensors its compressor writes."""
    scheme = preset_name_to_scheme(preset, ["Linear"])
    args = scheme.weights
    if args.group_size:
        groups = W.unflatten(-1, (-1, args.group_size))
        mn, mx = groups.amin(-1), groups.amax(-1)
    elif args.strategy == "tensor":
        mn, mx = W.amin().reshape(1), W.amax().reshape(1)
    else:
        mn, mx = W.amin(1, keepdim=True), W.amax(1, keepdim=True)
    gs = None
    if args.strategy == "tensor_group":
        gs = generate_gparam(W.amin(), W.amax()) if peak is None else generate_gparam(-peak, peak)
    scale, zp = calculate_qparams(mn, mx, args, global_scale=gs)
    ref = fake_quantize(W, scale, zp, args, global_scale=gs)
    state = {"weight": W, "weight_scale": scale.to(W.dtype), "weight_zero_point": zp}  # the scale param: W's dtype
    if gs is not None:
        state["weight_global_scale"] = gs
    compressor = BaseCompressor.get_value_from_registry(infer_module_format(torch.nn.Linear, scheme).value)
    written = compressor.compress(state, scheme)
    return ref, scale, gs, written, compressor.decompress(written, scheme)["weight"], scheme


def _pack(nibbles: torch.Tensor) -> torch.Tensor:
    """Two FP4 codes per byte, the even column in the low nibble."""
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", WEIGHTS)
def test_rtn_and_scales_equal_compressed_tensors(kind, dtype):
    fmt, preset = WEIGHTS[kind]
    W = _weight(dtype)
    ref, scale, gs, *_ = _ct(W, preset)
    Q, params = fmt.rtn_recorded(W)
    assert Q.dtype == dtype and torch.equal(_bits(Q), _bits(ref))
    assert params[0].dtype == scale.dtype and torch.equal(params[0], scale.expand_as(params[0]))
    if gs is not None:
        assert params[1].dtype == torch.float32 and torch.equal(params[1], gs.expand_as(params[1]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", WEIGHTS)
def test_codes_round_trip_and_are_what_a_checkpoint_stores(kind, dtype):
    fmt, preset = WEIGHTS[kind]
    W = _weight(dtype)
    _, _, _, written, loaded, _ = _ct(W, preset)
    Q, params = fmt.rtn_recorded(W)
    codes = fmt.codes(Q, params)
    assert codes.dtype == torch.uint8 and codes.shape == Q.shape
    assert torch.equal(_bits(fmt.dequantize(codes, params, dtype)), _bits(Q))
    assert torch.equal(_bits(loaded), _bits(fmt.dequantize(codes, params, loaded.dtype)))  # CT's (bf16 for FP4)
    if isinstance(fmt, FP8 | MXFP8):
        assert torch.equal(codes, _bits(written["weight"]))
    else:
        assert int(codes.max()) <= 15 and torch.equal(_pack(codes), written["weight_packed"])
    if isinstance(fmt, NVFP4):
        assert torch.equal(_bits(params[0].to(torch.float8_e4m3fn)), _bits(written["weight_scale"]))
        assert torch.equal(params[1][:1, 0], written["weight_global_scale"])
    elif isinstance(fmt, MXFP4 | MXFP8):
        assert torch.equal(mx_exponent(params[0]), written["weight_scale"])
    else:
        assert torch.equal(params[0][: written["weight_scale"].shape[0]].flatten(), written["weight_scale"].flatten())


@pytest.mark.parametrize("kind", WEIGHTS)
def test_storage_is_the_bits_of_the_checkpoint_tensors(kind):
    fmt, preset = WEIGHTS[kind]
    rows, cols = 24, 96
    written = _ct(_weight(torch.bfloat16, rows, cols), preset)[3]
    assert storage_bits(Level((fmt,)), rows, cols) == sum(t.numel() * t.element_size() * 8 for t in written.values())


@pytest.mark.parametrize("dtype", DTYPES)
def test_nvfp4_peers_set_the_global_scale_as_a_fused_group_does(dtype):
    W = _weight(dtype, seed=1)
    W[1, 5] = 0.05  # no outlier: the global scale follows the absmax
    peak = torch.maximum(W.abs().max(), (_weight(dtype, seed=2) * 1.7).abs().max())  # a sibling shard's is larger
    ref, scale, gs, *_ = _ct(W, "NVFP4A16", peak)
    Q, params = NVFP4().rtn_recorded(W, peers=peak.float())
    assert torch.equal(params[1], gs.expand_as(params[1])) and torch.equal(params[0], scale)
    assert torch.equal(_bits(Q), _bits(ref))
    assert not torch.equal(NVFP4().rtn_recorded(W)[1][1], params[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_global_and_mx_scales_equal_compressed_tensors(dtype):
    powers = 2.0 ** torch.arange(-20, 10)
    amax = torch.cat([torch.tensor([0.0, 1e-30, 1e-8, 3e4]), powers, powers * 1.75, powers * 1.7, powers * 1.99,
                      torch.rand(300, generator=torch.Generator().manual_seed(3)) * 5]).to(dtype)  # fmt: skip
    expected = torch.cat([generate_gparam(-a, a) for a in amax])
    assert torch.equal(global_scale(amax), expected)
    for preset, offset in (("MXFP4A16", 2), ("MXFP8A16", 8)):
        scale, _ = calculate_qparams(-amax / 2, amax, preset_name_to_scheme(preset, ["Linear"]).weights)
        assert torch.equal(mx_scale(amax, offset), scale)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp4_rounding_ties_as_cast_to_fp4(dtype):
    x = torch.arange(-7, 7, 0.0625, dtype=dtype)
    x = torch.cat([x, torch.tensor([-0.0, 0.0, -0.1, 1e-6], dtype=dtype)])
    assert torch.equal(_bits(cast_to_fp4(x)), _bits(ct_cast_to_fp4(x.clone())))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ACTS)
def test_activations_equal_forward_quantize(kind, dtype):
    fmt, preset = ACTS[kind]
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(4)) * 2
    x[0, 0] = 0
    x[0, 1, 3] = 300.0
    x[1, 2] *= 1e-4
    x[1, 3, :5] = -0.0
    x = x.to(dtype)
    module = torch.nn.Module()
    module.quantization_status = QuantizationStatus.FROZEN
    args = preset_name_to_scheme(preset, ["Linear"]).input_activations
    for state in [x.abs().max(), x.abs().max() / 50] if fmt.calibrated else [None]:  # calibrated below: clipping
        if state is not None:
            module.input_global_scale = torch.nn.Parameter(generate_gparam(-state, state), requires_grad=False)
        out = fmt.fake_quant(x, None if state is None else state.float())
        assert out.dtype == dtype and torch.equal(_bits(out), _bits(forward_quantize(module, x, "input", args)))


def test_anvfp4_without_calibration_is_refused_in_one_line():
    with pytest.raises(AllocatorError, match="calibrate") as refused:
        NVFP4Acts().fake_quant(torch.ones(2, 16))
    assert "\n" not in str(refused.value)


@pytest.fixture
def floats(monkeypatch):
    for cls in (FP8, NVFP4, MXFP4, MXFP8, Int8Acts, FP8Acts, NVFP4Acts):
        monkeypatch.setitem(KINDS, cls.kind, cls)


def test_names_parse_and_kernels(floats):
    for name in ("fp8", "fp8t", "nvfp4", "mxfp4", "mxfp8", "fp8+afp8", "fp8t+afp8", "nvfp4+anvfp4", "w8+a8",
                 "s0.5+nvfp4", "2:4+mxfp8"):  # fmt: skip
        assert parse_level(name).name == name
    assert parse_level("afp8+fp8").acts == FP8Acts()
    assert parse_level("fp8+afp8").kernel == "fp8-rowwise" == parse_level("fp8t+afp8").kernel  # per-token acts
    assert parse_level("fp8").kernel == "dense" and parse_level("fp8+a8").kernel == "dense"
    with pytest.raises(AllocatorError, match="two weights"):
        parse_level("fp8+nvfp4")
    with pytest.raises(AllocatorError, match="needs a weight format"):
        parse_level("anvfp4")


def test_group_formats_refuse_rows_their_group_does_not_divide(floats):
    assert unfit(parse_level("nvfp4"), 8, 40) == "nvfp4 needs input columns divisible by 16, got 40"
    assert unfit(parse_level("mxfp4"), 8, 48) == "mxfp4 needs input columns divisible by 32, got 48"
    assert "divisible by 16" in unfit(parse_level("fp8+anvfp4"), 8, 40)
    assert unfit(parse_level("nvfp4+anvfp4"), 8, 64) is None and unfit(parse_level("fp8"), 8, 40) is None


@pytest.mark.parametrize("backend", ["rtn", "gptq"])
@pytest.mark.parametrize("kind", WEIGHTS)
def test_backends_store_the_codes_and_scales_exactly(floats, kind, backend):
    gen = torch.Generator().manual_seed(5)
    W, X = (torch.randn(16, 64, generator=gen) * 0.02).bfloat16(), torch.randn(256, 64, generator=gen)
    stats = LayerStats(64)
    stats.add_batch(X)
    level = parse_level(kind)
    Q, params = compress_recorded(W, level, BACKENDS[backend], stats)
    parts, entries = encode_layer(W, {level: Q}, {level: params})
    assert entries[kind]["enc"] == "grid"
    assert torch.equal(decode(entries[kind], level, parts, tuple(W.shape)), Q)
