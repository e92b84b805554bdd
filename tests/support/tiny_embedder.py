"""A tiny random BERT sentence-transformers folder, built in code in well under a second.

Used by unit tests that need a real `SentenceTransformer` (real tokenizer, real forward pass, real pooling and
normalisation) without the 470 MB demo model:

    from tests.support.tiny_embedder import build_tiny_embedder
    folder = build_tiny_embedder(tmp_path / "tiny-embedder")   # then embedding.model = str(folder)

The weights are random (seeded), so similarities mean nothing; shapes, prefixes, normalisation, token counts and
the loading path are real. The vocabulary is WordPiece over single characters: common Chinese characters (BERT's
pre-tokenizer splits CJK text into characters), ASCII letters, digits and punctuation.
"""
from __future__ import annotations

from pathlib import Path

# ~300 of the most frequent Chinese characters plus the ones the tests' sample sentences use.
_CJK = (
    "的一是不了在人有我他这个们中来上大为和国地到以说时要就出会可也你对生能而子那得于着下自之年过发后作里用道行所然家"
    "种事成方多经么去法学如都同现当没动面起看定天分还进好小部其些主样理心她本前开但因只从想实日军者意无力它与长把机十"
    "民第公此已工使情明性知全三又关点正业外将两高间由问很最重并物手应战向头文体政美相见被利什二等产或新己制身果加西斯月"
    "话合回特代内信表化老给世位次度门任常先海通教儿原东声提立及比员解水名真论处走义各入几口认条平系气题活尔更别打女变四"
    "神总何电数安少报才结反受目太量再感建务做接必场件计管期市直德资命山金指克许统区保至队形社便空决治展马科司五基眼书非"
    "则听白却界达光放强即像难且权思王象完设式色路记南品住告类求据程北边死张该交规万取拉格望觉术领共确传师观清今切院让识"
    "候带导争运笑飞风步改收根干造言联持组每济车亲极林服快办议往元英士证近失转夫令准布始怎呢存未远叫台单影具罗字爱击流备"
    "兵连调深商算质团集百需价花党华城石级整府离况亚请技际约示复病息究线似官火断精满支视消越器容照须九增研写称企八功吗包片"
    "史委乎查轻易早曾除农找装广显吧阿李标谈吃图念六引历首医局突专费号尽另周较注语仅考落青随选列武红响虽推势参希古众构房半"
    "节土投某案黑维革划敌致陈律足态护七兴派孩验责营星够章音跟志底站严巴例防族供效续施留讲型料终答紧黄绝奇察母京段依批群项"
    "故按河米围江织害斗双境客纪采举杀攻父苏密低朝友诉止细愿千值仍男钱破网热助倒育属坐帝限船脸职速刻乐否刚威毛状率甚独球般"
    "普怕弹校苦创假久错承印晚兰试股拿脑预谁益阳若哪微尼继送急血惊伤素药适波夜省初喜卫源食险待述陆习置居劳财环排福纳欢雷"
    "你好再见苹果香蕉北京上海天气今天明天模型训练推理向量检索问答文档知识库分布式并行显存参数梯度优化"
)
_ASCII = "abcdefghijklmnopqrstuvwxyz0123456789"
_PUNCT = "。，、；：？！“”‘’（）《》「」『』…—·.,;:?!'\"()[]{}<>-_=+*/\\|#%&@$^~`"
_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _vocab() -> dict[str, int]:
    tokens = list(_SPECIAL)
    seen = set(tokens)
    for ch in _CJK + _ASCII + _PUNCT:
        if ch not in seen:
            seen.add(ch)
            tokens.append(ch)
    # "##x" continuations let WordPiece spell any ASCII word letter by letter instead of mapping it to [UNK].
    tokens += [f"##{ch}" for ch in _ASCII]
    return {tok: i for i, tok in enumerate(tokens)}


def build_tiny_embedder(path: Path, *, hidden_size: int = 32, max_seq_length: int = 128, seed: int = 0) -> Path:
    """Write a random 2-layer BERT sentence-transformers folder (mean pooling + normalisation) to `path`.

    Returns `path`. Deterministic for a given seed. `max_seq_length` is both the model's position limit and the
    sentence-transformers max_seq_length, so tests can exercise the token limit with short texts.
    """
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = Path(path)
    hf_dir = path / "_hf"
    vocab = _vocab()
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, handle_chinese_chars=True, strip_accents=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece()
    hf_tok = BertTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=max_seq_length,
    )
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=hidden_size * 2, max_position_embeddings=max_seq_length,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(hf_dir)
    hf_tok.save_pretrained(hf_dir)

    transformer = Transformer(str(hf_dir), max_seq_length=max_seq_length)
    model = SentenceTransformer(
        modules=[transformer, Pooling(transformer.get_embedding_dimension(), "mean"), Normalize()],
        device="cpu",
    )
    model.save(str(path))
    # The saved folder is self-contained; the intermediate HF folder is no longer needed.
    import shutil

    shutil.rmtree(hf_dir)
    return path
