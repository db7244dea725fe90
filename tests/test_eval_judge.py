"""AIR-Bench chat scoring against a fake OpenAI-compatible judge served on 127.0.0.1 by the test."""

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from qwen2audio.cli import main
from qwen2audio.eval import runner
from qwen2audio.eval.airbench import JUDGE_TEMPLATE, judge_prompt, parse_scores
from qwen2audio.eval.judge import Judge, JudgeError

from test_eval_e2e import FAST, airbench_chat, write

# (answer when the reference is Assistant 1, answer when the model's answer is Assistant 1), per question
ANSWERS = {
    0: ("9 7", "6 9"),                       # speech: model 7 and 6 -> 6.5
    1: ("9 8\n", "8 9"),                     # sound: 8
    2: ("Assistant 2 scores 5", "4 9"),      # music: one parse failure -> 4
    3: ("9 6", "6 9"),                       # speech_and_sound: 6
    4: ("9 10", "11 3"),                     # speech_and_music: out of range -> failure; 10
}


class FakeJudge:
    def __init__(self, answers=ANSWERS):
        self.requests = []
        self.fail_next = 0  # answer HTTP 500 this many times first
        self.cut_next = 0  # promise more bytes than sent this many times first (a reply cut short)

        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                if outer.fail_next:
                    outer.fail_next -= 1
                    self.send_response(500)
                    self.end_headers()
                    return
                if outer.cut_next:
                    outer.cut_next -= 1
                    self.send_response(200)
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    self.wfile.write(b'{"choices": [')
                    self.close_connection = True
                    return
                content = body["messages"][0]["content"]
                i = int(re.search(r"\[Question\]\nQuestion (\d)\?", content).group(1))
                reference_first = "[The Start of Assistant 1s Answer]\nAnswer" in content
                answer = answers[i][0 if reference_first else 1]
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer},
                                                "finish_reason": "stop"}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_judge():
    judge = FakeJudge()
    yield judge
    judge.close()


@pytest.fixture
def model_answers(monkeypatch, default_home):
    calls = []

    def fake(model, batch, settings):
        calls.append(len(batch))
        return [f"Model answer {item.id}." for item, _ in batch]

    monkeypatch.setattr(runner, "generate_batch", fake)
    monkeypatch.setattr("qwen2audio.eval.cli._load", lambda args: object())
    return calls


@pytest.mark.parametrize("answer, scores", [("8 7", (8, 7)), (" 8 7\n", (8, 7)), ("8\n7", None), ("8, 7", None),
                                            ("8 7 6", None), ("11 3", None), ("0 5", (0, 5)), ("10 0", (10, 0)),
                                            ("eight 7", None), ("8.5 7", None), ("", None)])
def test_parse_scores_follows_airbench(answer, scores):
    assert parse_scores(answer) == scores


def test_judge_prompt_is_airbench_template():
    text = judge_prompt("a dog barks", "What animal?", "A dog.", "A cat.")
    assert text.startswith("You are a helpful and precise assistant for checking the quality of the answer.\n"
                           "[Detailed Audio Description]\na dog barks\n[Question]\nWhat animal?\n"
                           "[The Start of Assistant 1s Answer]\nA dog.\n[The End of Assistant 1s Answer]\n"
                           "[The Start of Assistant 2s Answer]\nA cat.\n[The End of Assistant 2s Answer]\n[System]\n")
    assert text.endswith("The two scores are separated by a space.")
    assert "XAudioX" in JUDGE_TEMPLATE


def test_airbench_chat_scored_by_judge_in_both_orders_with_cache(tmp_path, fake_judge, model_answers, monkeypatch):
    data, refs = airbench_chat(tmp_path)
    out = tmp_path / "out"
    monkeypatch.setenv("QWEN2AUDIO_JUDGE_API_KEY", "sk-test")
    argv = ["eval", "--task", "airbench-chat", "--data", str(data), "--out", str(out), *FAST,
            "--judge-url", fake_judge.url, "--judge-model", "judge-x"]
    assert main(argv) == 0
    assert len(fake_judge.requests) == 10  # 5 items x 2 orders
    first = fake_judge.requests[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer sk-test"
    assert first["body"]["model"] == "judge-x" and first["body"]["max_tokens"] == 1024
    contents = [r["body"]["messages"][0]["content"] for r in fake_judge.requests]
    assert judge_prompt("A clip with sound 0.", "Question 0?", "Answer 0.", "Model answer 0.") in contents
    assert judge_prompt("A clip with sound 0.", "Question 0?", "Model answer 0.", "Answer 0.") in contents

    results = json.loads((out / "results.json").read_text())
    subsets = results["subsets"]
    assert subsets["speech"]["score"] == pytest.approx(6.5)
    assert subsets["sound"]["score"] == pytest.approx(8.0)
    assert subsets["music"]["score"] == pytest.approx(4.0)
    assert subsets["speech_and_sound"]["score"] == pytest.approx(6.0)
    assert subsets["speech_and_music"]["score"] == pytest.approx(10.0)
    assert subsets["mixed"]["score"] == pytest.approx(8.0)
    assert subsets["average"]["score"] == pytest.approx((6.5 + 8.0 + 4.0 + 8.0) / 4)
    assert results["overall"] is None  # AIR-Bench's overall number is the average of the categories
    assert results["judge"]["unreadable_verdicts"] == 2 and results["judge"]["items_without_verdict"] == 0
    assert results["judge"]["temperature"] == 0.0  # recorded: AIR-Bench's own judge sampled
    report = (out / "report.md").read_text()
    assert "| speech | 1 | judge score 1-10 | 6.50 |" in report and "| 7.18 | 7.24 |" in report
    assert "| average | 5 | judge score 1-10 | 6.62 | - | 6.93 | - |" in report
    assert "| speech_and_sound | 1 | judge score 1-10 | 6.00 | - | - | - |" in report
    records = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert {r["id"]: r["reference"] for r in records} == refs
    assert records[2]["judge"]["verdicts"]["reference first"] == "Assistant 2 scores 5"

    # A rerun costs nothing: answers and judge verdicts are both cached.
    model_answers.clear()
    assert main(argv) == 0
    assert model_answers == [] and len(fake_judge.requests) == 10
    assert json.loads((out / "results.json").read_text())["subsets"]["mixed"]["score"] == pytest.approx(8.0)


def test_airbench_chat_without_judge_keeps_answers_unscored(tmp_path, model_answers, monkeypatch):
    """Without --judge-url or QWEN2AUDIO_JUDGE_URL nothing is judged: an OPENAI_BASE_URL set for other tools
    does not send paid verdict requests (here to an address where nothing listens: a request would fail)."""
    monkeypatch.delenv("QWEN2AUDIO_JUDGE_URL", raising=False)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    data, _ = airbench_chat(tmp_path)
    assert main(["eval", "--task", "airbench-chat", "--data", str(data), "--out", str(tmp_path / "o"), *FAST]) == 0
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["judge"]["judged"] is False and results["scored"] == 0
    records = [json.loads(line) for line in (tmp_path / "o" / "items.jsonl").read_text().splitlines()]
    assert records[0]["prompt"].endswith("Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nQuestion 0?<|im_end|>\n"
                                         "<|im_start|>assistant\n")


def test_judge_retries_server_errors_and_reports_unreachable(tmp_path, fake_judge):
    judge = Judge(fake_judge.url, "m", cache=tmp_path / "cache.jsonl", retry_sleep_s=0)
    fake_judge.fail_next = 2
    content = judge_prompt("d", "Question 1?", "Answer 1.", "x")
    assert judge.ask(content) == "9 8\n"
    assert len(fake_judge.requests) == 3
    again = Judge(fake_judge.url, "m", cache=tmp_path / "cache.jsonl", retry_sleep_s=0)
    assert again.ask(content) == "9 8\n" and len(fake_judge.requests) == 3  # from the disk cache
    fake_judge.fail_next = 5
    with pytest.raises(JudgeError, match="HTTP 500"):
        judge.ask(judge_prompt("d", "Question 2?", "Answer 2.", "x"))
    dead = Judge("http://127.0.0.1:9/v1", "m", retries=1, retry_sleep_s=0, timeout_s=2)
    with pytest.raises(JudgeError, match="cannot reach"):
        dead.ask("hello")


# Two speech items; verdicts per order. cal_score.py averages each order over the verdicts that parse:
# reference first (model's score second): 8 and 0 -> 4; model first (model's score first): 2 only -> 2; mean 3.
# (The mean of per-item means would be (5 + 0) / 2 = 2.5.)
PER_ORDER = {0: ("9 8", "2 9"), 1: ("9 0", "no idea")}


def two_speech_items(root):
    folder = root / "Chat"
    rows = [{"path": f"{i}.wav", "question": f"Question {i}?", "answer_gt": f"Answer {i}.", "meta_info": "speech",
             "task_name": "speech_QA", "dataset_name": "d", "uniq_id": i} for i in (0, 1)]
    for row in rows:
        write(folder / "speech_QA_d" / row["path"], seed=row["uniq_id"])
    (folder / "Chat_meta.json").write_text(json.dumps(rows))
    return folder


def test_chat_category_score_is_the_mean_of_per_order_means_as_cal_score(tmp_path, model_answers):
    judge = FakeJudge(PER_ORDER)
    try:
        data = two_speech_items(tmp_path)
        assert main(["eval", "--task", "airbench-chat", "--data", str(data), "--out", str(tmp_path / "o"), *FAST,
                     "--judge-url", judge.url]) == 0
    finally:
        judge.close()
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["subsets"]["speech"]["score"] == pytest.approx(3.0)
    assert results["subsets"]["speech"]["n"] == 2 and results["judge"]["unreadable_verdicts"] == 1


def test_an_unreachable_judge_is_an_error_and_a_rerun_only_judges(tmp_path, fake_judge, model_answers, monkeypatch,
                                                                   capsys):
    monkeypatch.setattr("qwen2audio.eval.judge.time.sleep", lambda seconds: None)
    data, _ = airbench_chat(tmp_path)
    out = tmp_path / "out"
    dead = "http://127.0.0.1:9/v1"
    argv = ["eval", "--task", "airbench-chat", "--data", str(data), "--out", str(out), *FAST]
    assert main(argv + ["--judge-url", dead]) == 1
    err = capsys.readouterr().err
    assert "qwen2audio: error: the judge at http://127.0.0.1:9/v1/chat/completions failed" in err
    assert "run the same command again" in err and not (out / "results.json").exists()
    stored = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert [r["hypothesis"] for r in stored] == [f"Model answer {i}." for i in range(5)]
    model_answers.clear()
    assert main(argv + ["--judge-url", fake_judge.url]) == 0
    assert model_answers == [] and len(fake_judge.requests) == 10
    assert json.loads((out / "results.json").read_text())["subsets"]["speech"]["score"] == pytest.approx(6.5)


def test_a_reply_cut_short_is_retried_and_then_a_judge_error(tmp_path, fake_judge):
    """http.client's IncompleteRead escaped as a traceback, untried again."""
    judge = Judge(fake_judge.url, "m", retry_sleep_s=0)
    fake_judge.cut_next = 1
    content = judge_prompt("d", "Question 1?", "Answer 1.", "x")
    assert judge.ask(content) == "9 8\n" and len(fake_judge.requests) == 2
    fake_judge.cut_next = 5
    with pytest.raises(JudgeError, match="IncompleteRead"):
        Judge(fake_judge.url, "m", retries=3, retry_sleep_s=0).ask(judge_prompt("d", "Question 2?", "A.", "x"))
    assert len(fake_judge.requests) == 5


def test_an_interrupted_judging_sends_nothing_more(tmp_path):
    """Ctrl-C (or a failed judge) while the verdicts come: the queued requests are not sent (each one is a paid
    call), where the workers went on through the whole queue."""
    from qwen2audio.eval.airbench import score_chat

    class Interrupted:
        model, url, temperature, calls = "m", "u", 0.0, 0

        def ask(self, content):
            self.calls += 1
            if self.calls > 1:
                time.sleep(0.3)  # a request on the wire, while the first one's interrupt reaches the caller
            raise KeyboardInterrupt

    records = [{"id": str(i), "question": f"Question {i}?", "reference": "R.", "hypothesis": "H.", "meta_info": ""}
               for i in range(20)]
    judge = Interrupted()
    with pytest.raises(KeyboardInterrupt):
        score_chat(records, judge, workers=2)
    assert judge.calls <= 4  # what the two workers had in hand, not the 20 queued
