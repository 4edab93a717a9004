"""Stop sequences: text is cut at the earliest one, and a streamed tail that could start one is held back."""

from llama_jax.inference.stops import StopStream, cut_at_stop


def test_cut_at_earliest_stop():
    assert cut_at_stop("one. two\nthree", ["\n", "."]) == ("one", True)
    assert cut_at_stop("no stop here", ["###", ""]) == ("no stop here", False)


def test_stream_holds_back_a_possible_stop_and_releases_it_when_it_is_not():
    stream = StopStream(["\n\nQ:"])
    assert stream.push("Answer\n") == "Answer"      # "\n" may start the stop sequence
    assert stream.push("\nA") == "\n\nA"            # it did not
    assert stream.push(" yes\n\n") == " yes"
    assert (stream.push("Q: next"), stream.stopped) == ("", True)
    assert stream.push("more") == "" and stream.text == "Answer\n\nA yes"


def test_stream_finish_releases_the_held_tail():
    stream = StopStream(["END"])
    pieces = [stream.push(p) for p in ("the E", "N")] + [stream.finish()]
    assert pieces == ["the ", "", "EN"] and not stream.stopped
