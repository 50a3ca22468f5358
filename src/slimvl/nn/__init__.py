"""Shared primitives: every slimvl model is built from these."""
from .attention import Attention, attention_bias
from .masks import attention_mask, padding_mask, size_bias
from .blocks import MLP, Block, CrossBlock
from .embed import TEXT, VIDEO, ModalityEmbed, PatchEmbed, SpectrogramEmbed, TextEmbed
from .heads import AnswerHead, QueryDecoder
from .modalities import MODALITIES, Modality, register_modality
from .views import View, ViewAttention, view_map
from .fusion import SCHEMES, FusionEncoder, ViewBlock

__all__ = ["Attention", "attention_bias", "attention_mask", "padding_mask", "size_bias", "MLP", "Block", "CrossBlock",
           "PatchEmbed", "SpectrogramEmbed", "TextEmbed", "ModalityEmbed", "VIDEO", "TEXT", "QueryDecoder",
           "AnswerHead", "MODALITIES", "Modality", "register_modality", "View", "ViewAttention", "view_map",
           "FusionEncoder", "ViewBlock", "SCHEMES"]
