"""Recipes: every shipped recipe loads the same through any yaml reader as through maskprop's own."""

from pathlib import Path

import pytest
import yaml

from maskprop.train.config import load_config

RECIPE_DIR = Path(__file__).resolve().parents[1] / "recipes"
RECIPES = sorted(RECIPE_DIR.glob("*.yaml"))


def test_there_are_recipes():
    assert len(RECIPES) >= 10 and RECIPE_DIR / "quickstart.yaml" in RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=[path.stem for path in RECIPES])
def test_a_recipe_read_by_yaml_safe_load_gives_the_config_maskprop_reads(path):
    # ``maskprop.fit(yaml.safe_load(open(recipe)))`` takes this path: load_config of the mapping. PyYAML reads YAML 1.1,
    # where 5e-4 is the text '5e-4'; maskprop reads YAML 1.2, where it is a number. Both must give one configuration.
    with open(path, encoding="utf-8") as f:
        mapping = yaml.safe_load(f)
    assert load_config(mapping) == load_config(path)


def test_the_recipes_hold_exponent_numbers_that_yaml_1_1_reads_as_text():
    # Otherwise the test above would not test the exponent rule at all.
    def texts(tree):
        return [text for value in tree.values()
                for text in (texts(value) if isinstance(value, dict) else [value] if isinstance(value, str) else [])]

    quickstart = yaml.safe_load((RECIPE_DIR / "quickstart.yaml").read_text(encoding="utf-8"))
    assert quickstart["optim"]["weight_decay"] == "5e-4" and load_config(quickstart).optim.weight_decay == 5e-4
    found = {text for path in RECIPES for text in texts(yaml.safe_load(path.read_text(encoding="utf-8")))}
    assert {"5e-4", "12e-3", "1e-3"} <= found
