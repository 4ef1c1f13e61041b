"""The tensor layouts of prunekit.export.layouts: the same words and bits as compressed-tensors'
own packing helpers for every bit width, a hand-worked straddling word, prunekit's codes mapped
to the library's signed codes exactly, and decoders that refuse damaged entries."""

import benchmarks.torchvision_shim  # noqa: F401  (compressed_tensors imports transformers)
import pytest
import torch
from compressed_tensors.compressors.pack_quantized import helpers
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import dequantize
from compressed_tensors.utils import pack_bitmasks, unpack_bitmasks

from prunekit.export import layouts


@pytest.mark.parametrize("bits", range(1, 9))
def test_packed_words_are_the_librarys_for_every_width(bits):
    g = torch.Generator().manual_seed(bits)
    for cols in (1, 5, 31, 32, 33, 48, 100):
        codes = torch.randint(0, 2**bits, (6, cols), generator=g)
        signed = (codes - 2 ** (bits - 1)).to(torch.int8)
        packed = helpers.pack_to_int32(signed, bits)
        assert torch.equal(layouts.pack_int32(codes, bits), packed), cols
        assert torch.equal(layouts.unpack_int32(packed, bits, cols), codes), cols
        along_rows = helpers.pack_to_int32(signed, bits, packed_dim=0)  # how zero points pack
        assert torch.equal(layouts.pack_int32(codes.t(), bits).t(), along_rows), cols


def test_a_three_bit_value_straddles_two_words():
    """Eleven 3-bit values of 7: bits 0-29 hold ten of them, the eleventh takes bits 30-31 of
    the first word and bit 0 of the second."""
    packed = layouts.pack_int32(torch.full((1, 11), 7), 3)
    assert packed.tolist() == [[-1, 1]]  # 0xFFFFFFFF, 0x00000001
    assert layouts.unpack_int32(packed, 3, 11).tolist() == [[7] * 11]
    first_bit = layouts.pack_int32(torch.tensor([[1, 0, 0]]), 3)
    assert first_bit.tolist() == [[1]]  # value 0 in the lowest bits


def test_bitmask_rows_are_the_librarys_bits():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(7, 21, generator=g) > 0.5
    assert torch.equal(layouts.pack_bitmask_rows(mask), pack_bitmasks(mask))
    assert torch.equal(layouts.unpack_bitmask_rows(pack_bitmasks(mask), 21), mask)
    assert torch.equal(unpack_bitmasks(layouts.pack_bitmask_rows(mask), [7, 21]), mask)
    one = torch.zeros(1, 9, dtype=torch.bool)
    one[0, 1] = True
    assert layouts.pack_bitmask_rows(one).tolist() == [[2, 0]]  # weight 1 -> bit 1 of byte 0


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize(("bits", "group_size"), [(4, None), (4, 8), (3, 8), (8, None), (2, 8)])
def test_prunekit_codes_dequantize_in_the_library_to_prunekits_weights(bits, group_size, symmetric):
    """``scale · (c − z)`` (prunekit) equals the library's ``dequantize`` of the stored signed
    codes and zero point, bit for bit, packed or not."""
    g = torch.Generator().manual_seed(bits)
    d_out, d_in = 6, 24
    n_groups = 1 if group_size is None else d_in // group_size
    codes = torch.randint(0, 2**bits, (d_out, d_in), generator=g).to(torch.uint8)
    scale = torch.rand(d_out, n_groups, generator=g) + 0.01
    mid = 2 ** (bits - 1)
    zero = torch.full((d_out, n_groups), mid) if symmetric else torch.randint(0, 2**bits, (1,))
    zero = zero.expand(d_out, n_groups).to(torch.uint8)
    size = d_in if group_size is None else group_size
    prunekit_weights = scale.repeat_interleave(size, 1) * (
        codes.float() - zero.float().repeat_interleave(size, 1)
    )
    strategy = "channel" if group_size is None else "group"
    args = QuantizationArgs(num_bits=bits, symmetric=symmetric, strategy=strategy,
                            group_size=group_size)  # fmt: skip
    for packed in (False, True):
        entry = layouts.quantized_encode(codes, scale, zero, bits, symmetric=symmetric,
                                         packed=packed)  # fmt: skip
        assert ("weight_zero_point" in entry) != symmetric
        q = (
            layouts.unpack_int32(entry["weight_packed"], bits, d_in) - mid
            if packed
            else entry["weight"]
        )
        zp = None if symmetric else (zero.to(torch.int16) - mid).to(torch.int8)
        library = dequantize(q, scale, zp, args)
        assert torch.equal(library, prunekit_weights)
        ours = layouts.quantized_decode(entry, bits, symmetric=symmetric, packed=packed,
                                        strategy=strategy, group_size=group_size)  # fmt: skip
        assert torch.equal(ours, prunekit_weights)


def test_a_symmetric_grid_must_have_its_zero_at_the_mid_code():
    codes, scale = torch.zeros(2, 4, dtype=torch.uint8), torch.ones(2, 1)
    zero = torch.tensor([[8], [7]], dtype=torch.uint8)
    with pytest.raises(ValueError, match="not symmetric"):
        layouts.quantized_encode(codes, scale, zero, 4, symmetric=True, packed=True)


def test_two_four_keeps_the_nonzeros_then_the_first_zeros_of_each_group():
    w = torch.tensor([[0.0, 3.0, 0.0, 0.0, 1.0, 0.0, 0.0, 2.0]])
    entry = layouts.sparse24_encode(w)
    assert entry["compressed"].tolist() == [[0.0, 3.0, 1.0, 2.0]]
    assert layouts.unpack_bitmask_rows(entry["bitmask"], 8).tolist() == [
        [True, True, False, False, True, False, False, True]
    ]
    assert torch.equal(layouts.sparse24_decode(entry), w)
    with pytest.raises(ValueError, match="1 groups of 4 consecutive inputs hold more than 2"):
        layouts.sparse24_encode(torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    with pytest.raises(ValueError, match="not a multiple of 4"):
        layouts.sparse24_encode(torch.ones(2, 6))


def test_decoders_refuse_damaged_entries():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 11, generator=g) * (torch.rand(5, 11, generator=g) > 0.5)
    entry = layouts.bitmask_encode(w)
    assert torch.equal(layouts.bitmask_decode(entry), w)
    with pytest.raises(ValueError, match="bits set"):
        layouts.bitmask_decode(entry | {"compressed": entry["compressed"][:-1]})
    with pytest.raises(ValueError, match="row_offsets"):
        layouts.bitmask_decode(entry | {"row_offsets": entry["row_offsets"] + 1})
    with pytest.raises(ValueError, match="bitmask must be uint8 of shape"):
        layouts.bitmask_decode(entry | {"bitmask": entry["bitmask"][:, :1]})
    packed = layouts.quantized_encode(
        torch.zeros(3, 8, dtype=torch.uint8), torch.ones(3, 1), torch.zeros(3, 1, dtype=torch.uint8),
        4, symmetric=False, packed=True,
    )  # fmt: skip
    decode = dict(bits=4, packed=True, strategy="channel")
    assert layouts.quantized_decode(packed, symmetric=False, **decode).shape == (3, 8)
    with pytest.raises(ValueError, match="symmetric scheme with a zero point"):
        layouts.quantized_decode(packed, symmetric=True, **decode)
    with pytest.raises(ValueError, match="scale has shape"):
        layouts.quantized_decode(packed | {"weight_scale": torch.ones(3, 2)}, symmetric=False,
                                 **decode)  # fmt: skip
