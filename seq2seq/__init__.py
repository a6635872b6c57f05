"""Attention LSTM sequence-to-sequence translation."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `from seq2seq import Translator` without importing torch for every submodule user
    if name == "Translator":
        from .translate import Translator
        return Translator
    raise AttributeError(name)
