import pytest

from autokd import Registry


def test_register_get_build():
    reg = Registry("widget")

    @reg.register("box")
    def box(size=1, scale=1):
        return size * scale

    assert reg.get("box") is box
    assert reg.build("box") == 1
    assert reg.build({"key": "box", "kwargs": {"size": 3}}, scale=2) == 6
    assert "box" in reg and list(reg) == ["box"] and len(reg) == 1


def test_duplicate_key_raises():
    reg = Registry("widget")
    reg.register("a", 1)
    with pytest.raises(KeyError, match="already registered"):
        reg.register("a", 2)


def test_unknown_key_names_close_matches_and_known_list():
    reg = Registry("distance")
    for k in ("l2", "kl", "gram_l2"):
        reg.register(k, k)
    with pytest.raises(KeyError) as e:
        reg.get("gram_l3")
    msg = str(e.value)
    assert "unknown distance 'gram_l3'" in msg and "did you mean 'gram_l2'" in msg
    assert "Known: gram_l2, kl, l2" in msg


def test_bad_config_shape():
    reg = Registry("widget")
    reg.register("a", dict)
    with pytest.raises(ValueError, match="expected {key: ..., kwargs"):
        reg.build({"name": "a"})
    with pytest.raises(TypeError):
        reg.build(3)
