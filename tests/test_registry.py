"""The methods' cards are the one source the command line, the docs and the
README read: nothing may drift from them."""

import inspect
import pathlib
import re

import pytest

import sharpjax as sj
from sharpjax._src import registry
from sharpjax.cli import _methods

ROOT = pathlib.Path(__file__).resolve().parents[1]
CARDS = [c for c in registry.CARDS if c.constructor is not None]


def _flat(text):
  return re.sub(r"\s+", " ", text)


def test_defaults_are_read_from_the_constructor():
  assert registry.card("sam").defaults() == {"rho": 0.05}
  assert registry.card("esam").defaults() == {"rho": 0.05, "beta": 0.6,
                                              "gamma": 0.5}
  for card in CARDS:
    parameters = inspect.signature(card.constructor).parameters
    assert set(card.needs + card.hyper) <= set(parameters), card.name
    assert card.constructor is getattr(sj, card.constructor.__name__)


@pytest.mark.parametrize("card", CARDS, ids=lambda c: c.name)
def test_each_docstring_cites_its_cards_papers(card):
  doc = _flat(inspect.getdoc(card.constructor))
  for paper in card.papers:
    assert _flat(paper.citation) in doc, (card.name, paper.citation)
    assert paper.url in doc, (card.name, paper.url)


def test_the_readme_table_is_the_cards_table():
  readme = (ROOT / "README.md").read_text()
  assert registry.markdown_table() in readme, (
      "README.md's method table differs from registry.markdown_table(): "
      "paste its output in place of the table")


def test_the_command_line_reads_the_cards():
  assert _methods.names() == registry.names()
  for name in registry.names():
    method, card = _methods.get(name), registry.card(name)
    assert card.summary in method.summary and card.cost in method.summary
    for k, v in card.defaults().items():
      assert method.defaults[k] in (v, _methods.AUTO), (name, k)
    if card.papers:
      assert method.reference == card.papers[0].citation


def test_an_unknown_card_names_the_known_ones():
  with pytest.raises(KeyError, match="known: sgd, sam"):
    registry.card("sharp")
