"""One registry helper, the same verbs and the same error for every kind."""

import pytest

import prunekit
from prunekit.config import ConfigError
from prunekit.distributed import available_codecs, get_codec, register_codec
from prunekit.methods import available, get_method
from prunekit.posttrain import available_compressors, get_compressor
from prunekit.registry import Registry
from prunekit.structured.registry import available_structured, get_structured


def test_verbs_of_one_registry():
    reg: Registry[type] = Registry("widget")
    seen = []
    deco = reg.decorator("b", prepare=seen.append)

    class B:
        pass

    assert deco(B) is B and seen == [B]
    reg.add("a", int)
    assert reg.names() == ["a", "b"] and reg.entries() == [int, B] and "a" in reg
    assert reg.get("b") is B
    reg.add("a", int)  # the same entry again: a no-op
    with pytest.raises(ConfigError, match=r"widget 'a' is already registered \(int\)"):
        reg.add("a", float)
    with pytest.raises(ConfigError, match="unknown widget 'c'; available: a, b"):
        reg.get("c")
    with pytest.raises(ConfigError, match=r"unknown widget \['a'\]"):
        reg.get(["a"])  # not hashable: still the one error
    with pytest.raises(ConfigError, match="non-empty string"):
        reg.add("", int)


@pytest.mark.parametrize(
    ("get", "kind"),
    [
        (get_method, "method"),
        (get_compressor, "post-training method"),
        (get_structured, "structured optimizer"),
        (get_codec, "gradient compression method"),
    ],
)
def test_every_part_refuses_an_unknown_name_with_one_error(get, kind):
    with pytest.raises(ConfigError, match=f"unknown {kind} 'nope'; available: "):
        get("nope")


def test_prunekit_available_lists_every_part_by_kind():
    assert prunekit.available() == {
        "methods": available(),
        "posttrain": available_compressors(),
        "structured": available_structured(),
        "distributed": available_codecs(),
    }
    assert all(prunekit.available().values())


def test_a_taken_codec_name_is_refused_and_the_call_form_is_deprecated():
    entry = get_codec("none")
    with pytest.raises(ConfigError, match="gradient compression method 'none' is already"):
        register_codec("none", entry.config_class, entry.state_class)(lambda s, b: None)
    with pytest.warns(DeprecationWarning, match="use it as a decorator"):
        again = register_codec("none", entry.config_class, entry.state_class, entry.hook)
    assert again == entry


def test_one_word_one_meaning_for_ratio(monkeypatch):
    """Top-k's ``ratio`` is the fraction of values sent; the state's traffic figure is
    ``compression`` (bytes_dense / bytes_sent), its old name deprecated."""
    from prunekit.distributed import TopKConfig, TopKState

    assert TopKConfig(ratio=0.01).ratio == 0.01
    monkeypatch.setattr(TopKState, "bytes_sent", property(lambda self: 10.0))
    monkeypatch.setattr(TopKState, "bytes_dense", property(lambda self: 500.0))
    state = object.__new__(TopKState)  # the traffic figures alone; no process group needed
    assert state.compression == 50.0
    with pytest.warns(DeprecationWarning, match="use CommState.compression"):
        assert state.ratio == 50.0
