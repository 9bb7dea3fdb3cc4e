from ctxc.document import GAP_MARK, paragraphs, refine_units, render, split_units


def test_sentences_respect_abbreviations_and_soft_wraps():
    text = ("Dr. Smith met Mr. Jones at 5 p.m. in the U.S. Capitol. They talked.\n\n"
            "This line is hard-wrapped in the middle of a\nsentence that continues here. Next one!")
    units = [u.text(text) for u in split_units(text)]
    assert units[0].startswith("Dr. Smith met Mr. Jones")
    assert "They talked." in units
    assert "This line is hard-wrapped in the middle of a\nsentence that continues here." in units
    assert units[-1] == "Next one!"


def test_headings_and_single_newline_paragraphs_split():
    text = "Introduction\nSection 420 authorizes grants. It was amended.\nUnder House rules, drafts wait."
    units = [u.text(text) for u in split_units(text)]
    assert units == ["Introduction", "Section 420 authorizes grants.", "It was amended.", "Under House rules, drafts wait."]


def test_units_cover_all_non_space_text_in_order():
    text = "Alpha beta. Gamma!\n\n\n  Delta?  Epsilon\n\nZeta"
    units = split_units(text)
    assert [u.start for u in units] == sorted(u.start for u in units)
    assert "".join(text[u.start:u.end] for u in units).replace(" ", "") == "".join(text.split()).replace(" ", "")
    assert len(paragraphs(text)) == 3


def test_refine_splits_into_clauses_then_words():
    text = "one two three, four five six; seven eight nine ten eleven twelve"
    units = split_units(text)
    fine = refine_units(text, units, lambda s, e: len(text[s:e].split()) > 3)
    pieces = [u.text(text) for u in fine]
    assert pieces[:2] == ["one two three,", "four five six;"]
    assert all(len(p.split()) <= 3 for p in pieces)
    assert " ".join(pieces).split() == text.split()


def test_render_keeps_original_gaps_between_neighbours_and_marks_cuts():
    text = "A one. A two.\n\nB one. B two. B three."
    units = split_units(text)
    out = render(text, units, [0, 1, 4])
    assert out.text == "A one. A two.\n\nB three."
    assert out.kept == [(0, 13), (text.index("B three"), len(text))]
    marked = render(text, units, [0, 4], mark_gaps=True)
    assert marked.text == f"A one.\n{GAP_MARK}\nB three."
    lead = render(text, units, [2], mark_gaps=True)
    assert lead.text == f"{GAP_MARK}\nB one.\n{GAP_MARK}"
