"""Large label vocabularies for the bench scripts, built offline from the ImageNet class names."""

from __future__ import annotations

from clip_decoder.prior import imagenet_class_names

# Eleven forms of each of the 1,000 class names give over 10,000 distinct, plausible label names;
# forms like "toy dog" are deliberately close to real labels, so a shortlist has to earn its hits.
FORMS = ("{}", "small {}", "large {}", "old {}", "toy {}", "red {}", "black {}", "white {}", "wooden {}", "cartoon {}",
         "broken {}")


def large_vocabulary(size: int, exclude: set[str] = frozenset()) -> list[str]:
    """``size`` distinct label names: every class name first, then each of them in the next form."""
    names = [form.format(name) for form in FORMS for name in imagenet_class_names()]
    labels = [name for name in dict.fromkeys(names) if name not in exclude]
    if size > len(labels):
        raise ValueError(f"at most {len(labels)} labels can be built, asked for {size}")
    return labels[:size]
