"""In-context learning: classify (or answer) with a frozen language model and a few examples in the prompt.

    from minift.icl import ICLClassifier, KNNSelector, Template, classification_report

    template = Template(instruction="Classify the sentiment of each tweet.",
                        example_format="Tweet: {text}\\nSentiment: {label}",
                        verbalizers={"negative": ["negative"], "neutral": ["neutral"], "positive": ["positive"]})
    clf = ICLClassifier(model, tokenizer, template, selector=KNNSelector(), shots=8, calibrate=True)
    clf.fit(train_texts, train_labels)
    print(classification_report(test_labels, clf.predict(test_texts).predictions, template.labels).summary())

One concept per file, in the order a query meets them:

    templates.py    instruction, example format, separator, label words; plain or ChatML prompts
    bm25.py         Okapi BM25 lexical relevance (k1 = 1.5, b = 0.75)
    embeddings.py   mean-pooled hidden states of any minift model (MiniLM by default)
    selectors.py    random (stratified), BM25, kNN, maximal marginal relevance
    arrange.py      demonstration order (similarity, random, label-balanced) and the token-budget fitter
    scoring.py      log-likelihood of each label word, with the shared prefix in a KV cache
    generation.py   free generation and answer parsing
    calibration.py  contextual calibration with content-free inputs (Zhao et al. 2021)
    classify.py     the pipeline (ICLClassifier) and the accuracy / per-class report
    search.py       prompt search: best template and label words on a dev split
    retrieval.py    chunk + embed + safetensors index + top-k passages for question answering
    cli.py          `minift icl`
"""

from minift.icl.arrange import fit_to_budget, order_demonstrations
from minift.icl.bm25 import BM25Index, bm25_terms
from minift.icl.calibration import CONTENT_FREE_INPUTS, calibrate, calibrated_predictions, content_free_distribution
from minift.icl.classify import ClassificationReport, ICLClassifier, ICLResult, classification_report
from minift.icl.embeddings import Embedder, PrecomputedEmbedder
from minift.icl.generation import AnswerGenerator, parse_answer
from minift.icl.retrieval import VectorIndex, answer_question, chunk_text, rag_prompt
from minift.icl.scoring import LabelScorer, PrefixCache, PromptEncoder, score_cached, score_full
from minift.icl.search import search_prompts, search_verbalizers, verbalizer_combinations
from minift.icl.selectors import BM25Selector, FixedSelector, KNNSelector, MMRSelector, RandomSelector, Selection, make_selector, mmr_order
from minift.icl.templates import Prompt, Template, default_template, sentiment_templates

__all__ = [
    "AnswerGenerator", "BM25Index", "BM25Selector", "CONTENT_FREE_INPUTS", "ClassificationReport", "Embedder", "FixedSelector",
    "ICLClassifier", "ICLResult", "KNNSelector", "LabelScorer", "MMRSelector", "PrecomputedEmbedder", "PrefixCache",
    "Prompt", "PromptEncoder", "RandomSelector", "Selection", "Template", "VectorIndex", "answer_question",
    "bm25_terms", "calibrate", "calibrated_predictions", "chunk_text", "classification_report",
    "content_free_distribution", "default_template", "fit_to_budget", "make_selector", "mmr_order",
    "order_demonstrations", "parse_answer", "rag_prompt", "score_cached", "score_full", "search_prompts",
    "search_verbalizers", "sentiment_templates", "verbalizer_combinations",
]
