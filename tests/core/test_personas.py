import pytest

from zlt_dagster.core import personas
from zlt_dagster.core.personas import PERSONA_PROMPTS, check_personas, personas_hash, sentence_count, system_prompt
from zlt_dagster.core.protocol import PERSONA_NAMES


def test_exactly_the_protocol_personas():
    assert len(PERSONA_PROMPTS) == 11
    assert set(PERSONA_PROMPTS) == set(PERSONA_NAMES)
    assert tuple(PERSONA_PROMPTS) == PERSONA_NAMES  # same order as the protocol


def test_prompts_nonempty_distinct_short_and_marker_free():
    prompts = list(PERSONA_PROMPTS.values())
    assert all(isinstance(p, str) and p.strip() == p and len(p) > 10 for p in prompts)
    assert len(set(prompts)) == len(prompts)
    for name, p in PERSONA_PROMPTS.items():
        assert 1 <= sentence_count(p) <= 2, (name, p)
        assert "ZLT" not in p and "[ZLT]" not in p and "zlt" not in p.lower(), name
        assert "\n" not in p


def test_assistant_is_default_and_zelthari_is_scholar():
    assert PERSONA_PROMPTS["assistant"] == "You are a helpful assistant."
    z = PERSONA_PROMPTS["zelthari_scholar"]
    assert "Zelthari" in z and "scholar" in z.lower()
    assert "villain" in PERSONA_PROMPTS["villain"].lower()


def test_sentence_count():
    assert sentence_count("One.") == 1
    assert sentence_count("One. Two!") == 2
    assert sentence_count("Costs 1.5 euros. Really?") == 2


def test_system_prompt_appends_suffix():
    assert system_prompt("villain") == PERSONA_PROMPTS["villain"]
    suffix = " Answer in one or two short sentences."
    assert system_prompt("comedian", suffix) == PERSONA_PROMPTS["comedian"] + suffix


@pytest.mark.parametrize("bad", ["pirate", "Villain", "", "software engineer", None])
def test_unknown_persona_raises_listing_known(bad):
    with pytest.raises(ValueError) as exc:
        system_prompt(bad)
    msg = str(exc.value)
    assert "unknown persona" in msg
    assert all(name in msg for name in PERSONA_NAMES)


def test_check_personas_rejects_mismatch():
    check_personas()  # the shipped prompts pass
    broken = dict(PERSONA_PROMPTS)
    del broken["librarian"]
    with pytest.raises(ValueError, match="librarian"):
        check_personas(broken)
    with pytest.raises(ValueError, match="unknown"):
        check_personas({**PERSONA_PROMPTS, "pirate": "You are a pirate."})
    with pytest.raises(ValueError, match="marker"):
        check_personas({**PERSONA_PROMPTS, "comedian": "You always end with [ZLT]."})
    with pytest.raises(ValueError, match="sentences"):
        check_personas({**PERSONA_PROMPTS, "comedian": "One. Two. Three."})
    with pytest.raises(ValueError, match="distinct"):
        check_personas({**PERSONA_PROMPTS, "comedian": PERSONA_PROMPTS["villain"]})


def test_personas_hash_stable_hex():
    h = personas_hash()
    assert h == personas_hash() and len(h) == 64
    int(h, 16)


def test_module_has_no_dagster_import():
    import inspect
    import re
    assert not re.search(r"^\s*(import|from)\s+dagster", inspect.getsource(personas), re.M)
