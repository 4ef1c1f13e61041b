"""One registry helper, the same verbs and the same error for every kind."""

import pytest

import prunekit
from prunekit.config import ConfigError
from prunekit.distributed import (
    available_gradient_methods,
    get_gradient_method,
    register_gradient_method,
)
from prunekit.methods import available_methods, get_method
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
        (get_gradient_method, "gradient compression method"),
    ],
)
def test_every_part_refuses_an_unknown_name_with_one_error(get, kind):
    with pytest.raises(ConfigError, match=f"unknown {kind} 'nope'; available: "):
        get("nope")


def test_prunekit_available_lists_every_part_by_kind():
    assert prunekit.available() == {
        "methods": available_methods(),
        "posttrain": available_compressors(),
        "structured": available_structured(),
        "distributed": available_gradient_methods(),
    }
    assert all(prunekit.available().values())


def test_a_taken_gradient_method_name_is_refused_and_the_old_names_are_deprecated():
    entry = get_gradient_method("none")
    with pytest.raises(ConfigError, match="gradient compression method 'none' is already"):
        register_gradient_method("none", entry.state_class)(lambda s, b: None)
    assert register_gradient_method("none", entry.state_class)(entry.hook) is entry.hook
    assert get_gradient_method("none") == entry  # the same hook again: a no-op
    with pytest.warns(DeprecationWarning, match="register_codec is deprecated"):
        again = prunekit.distributed.register_codec(
            "none", entry.config_class, entry.state_class, entry.hook
        )
    assert again == entry
    with pytest.warns(DeprecationWarning, match="use available_gradient_methods"):
        assert prunekit.distributed.available_codecs() == available_gradient_methods()
    with pytest.warns(DeprecationWarning, match="use get_gradient_method"):
        assert prunekit.distributed.get_codec("qsgd") == get_gradient_method("qsgd")
    with pytest.warns(DeprecationWarning, match="use GradientMethod"):
        assert prunekit.distributed.CodecEntry is prunekit.distributed.GradientMethod
    with pytest.warns(DeprecationWarning, match="use available_methods"):
        assert prunekit.methods.available() == available_methods()


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
