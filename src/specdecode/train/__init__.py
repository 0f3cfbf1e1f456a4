"""Training a feature draft head for a target by self-distillation (``specdecode train-draft``).

Stages, each resumable (its output is kept under ``OUT/work`` and skipped when already there):

1. prompts: made from templates (``prompts``) or written by the target itself, never from the benchmark;
2. answers: the target's own greedy answers, generated in batches; a second round asks about
   passages the target wrote in the first round, so the head also learns to copy; a third round
   (``--varied-prompts``) asks further kinds of request and samples the answers (temperature 0.7)
   for variety - the labels are always the target's greedy tokens; a fourth asks about topics from
   the target's vocabulary; a fifth (``--self-prompts``) asks what the target itself writes when
   given the chat template up to the user's text (Magpie), the closest thing to real users' requests
   that needs no data from outside;
3. features: at every position, the feature ``f_t`` and the target's greedy next token (the label
   the verifier will check drafts against), captured by hooks while stage 2 generates (where an
   answer was written without them, as by an older version, one target pass per sequence);
4. training: the head learns to predict the next feature and the target's token at answer
   positions, unrolled over ``--depth`` draft steps so that it also learns to continue from its own
   predictions; checkpoints every epoch, so a stopped run resumes where it was;
5. export: ``OUT/model.safetensors`` and ``OUT/config.json`` (with the target's fingerprint).
"""

from .options import TrainOptions

__all__ = ["TrainOptions", "train_head"]


def __getattr__(name: str):
    if name == "train_head":  # imports torch: only when training
        from .pipeline import train_head

        return train_head
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
