// The voice-chat and audio-analysis page of `qwen2audio serve`. It speaks only the server's public API:
// POST /v1/chat/completions (streamed), POST /v1/audio/transcriptions (verbose_json, streamed: a transcript with times),
// GET /health, and GET /web/config for the limits and defaults.
// No framework and nothing from another site: the page works offline beside the server.

const $ = (id) => document.getElementById(id);
const SAMPLE_RATE = 16000; // recordings are sent as 16 kHz mono WAV, what the model hears
const MIN_RECORDING_SECONDS = 0.2;
const HEALTH_RETRY_MS = 2000;
const HEALTH_WATCH_MS = 10000;
const SETTINGS_KEY = "qwen2audio.settings";
// What Python's str.split() splits at (the server's cues join a segment's words by one space)
const PY_WHITESPACE = /[\t\n\v\f\r \x1c-\x1f\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+/;
const NUMBER_FIELDS = ["temperature", "top_p", "top_k", "repetition_penalty", "num_beams", "max_tokens", "seed"];

const state = {
  config: { model: "default", max_audio_seconds: 600, max_body_bytes: 25 << 20, max_tokens: 1024,
            api_key_required: false, defaults: {} },
  history: [],       // {role: "user", text, audio?: {b64, format, url, seconds}, voice?: the same} | {role: "assistant", text}
  attachment: null,  // the audio of the turn being composed
  recorder: null,    // {ctx, stream, chunks, samples, timer}
  micBusy: false,    // the microphone is being opened or the recording prepared: a press meanwhile is the same press
  controller: null,  // AbortController of the answer being streamed (or the transcript being made)
  downloads: [],     // object URLs of the subtitle files offered for download
};

// -- start --------------------------------------------------------------------------------------------------
document.addEventListener("DOMContentLoaded", () => {
  wire();
  loadSettings();
  loadConfig().then(watchHealth);
});

function wire() {
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("text").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  $("text").addEventListener("input", autoGrow);
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("mic").addEventListener("click", () => {
    if (state.micBusy) return; // a double click: one microphone opened (not two, one left on), one recording sent
    if (state.recorder) finishRecording("send"); else startRecording();
  });
  $("recording-keep").addEventListener("click", () => finishRecording("keep"));
  $("recording-cancel").addEventListener("click", () => finishRecording("cancel"));
  $("file").addEventListener("change", (e) => { attachFile(e.target.files[0]); e.target.value = ""; });
  document.querySelector("label.upload").addEventListener("keydown", (e) => { // reachable from the keyboard
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file").click(); }
  });
  $("attachment-remove").addEventListener("click", () => setAttachment(null));
  $("transcribe").addEventListener("click", transcribe);
  $("new-chat").addEventListener("click", newChat);
  $("error-close").addEventListener("click", hideError);
  $("open-settings").addEventListener("click", () => toggleSettings());
  $("close-settings").addEventListener("click", () => toggleSettings(false));
  $("reset-settings").addEventListener("click", resetSettings);
  $("settings-form").addEventListener("input", saveSettings);
  $("settings-form").addEventListener("submit", (e) => { e.preventDefault(); toggleSettings(false); });
  $("settings").addEventListener("keydown", (e) => { if (e.key === "Escape") { e.preventDefault(); toggleSettings(false); } });
  wireDrop();
}

async function loadConfig() {
  try {
    const res = await fetch("/web/config");
    if (res.ok) state.config = await res.json();
  } catch (_) { /* the health check says the server is unreachable */ }
  const defaults = state.config.defaults || {};
  for (const name of NUMBER_FIELDS) {
    const value = name === "max_tokens" ? defaults.max_tokens ?? state.config.max_tokens : defaults[name];
    field(name).placeholder = value === undefined || value === null ? "model default" : String(value);
  }
  field("max_tokens").max = String(state.config.max_tokens);
  if (state.config.api_key_required && !field("api_key").value) {
    showError("This server needs an API key: enter it in Settings.");
    toggleSettings(true, field("api_key"));
  }
}

async function watchHealth() {
  const status = $("status");
  try {
    const res = await fetch("/health", { cache: "no-store" });
    const body = await res.json().catch(() => ({}));
    if (res.ok) {
      status.textContent = status.title = `${body.model || state.config.model} · ready`;
      status.className = "status ok";
      setTimeout(watchHealth, HEALTH_WATCH_MS); // and on: a server that stops is shown as gone
      return;
    }
    status.textContent = status.title = body.status === "stopping" ? "the server is shutting down" : "loading the model…";
    status.className = "status";
  } catch (_) {
    status.textContent = status.title = "server unreachable";
    status.className = "status bad";
  }
  setTimeout(watchHealth, HEALTH_RETRY_MS);
}

// -- settings -----------------------------------------------------------------------------------------------
function field(name) { return $("settings-form").elements.namedItem(name); }

function loadSettings() {
  let saved = {};
  try { saved = JSON.parse(localStorage.getItem(SETTINGS_KEY) || "{}"); } catch (_) { /* start afresh */ }
  for (const [name, value] of Object.entries(saved)) {
    const el = field(name);
    if (!el) continue;
    if (el.type === "checkbox") el.checked = value === true; else el.value = value;
  }
}

function saveSettings() {
  const values = {};
  for (const el of $("settings-form").elements) if (el.name) values[el.name] = el.type === "checkbox" ? el.checked : el.value;
  try { localStorage.setItem(SETTINGS_KEY, JSON.stringify(values)); } catch (_) { /* private mode: not kept */ }
}

function resetSettings() {
  for (const name of NUMBER_FIELDS) field(name).value = "";
  field("system").value = "";
  saveSettings();
}

/** Open or close the settings; opened, the keyboard goes to ``focus`` (default: the first field), closed
 * (Done, Escape) back to the Settings button when it was inside the panel. */
function toggleSettings(open, focus = null) {
  const panel = $("settings");
  const show = open === undefined ? panel.hidden : open;
  const inside = panel.contains(document.activeElement);
  panel.hidden = !show;
  $("open-settings").setAttribute("aria-expanded", String(show));
  if (show) (focus || field("system")).focus();
  else if (inside) $("open-settings").focus();
}

/** The sampling fields the user set (empty ones are left to the model's generation config). */
function sampling() {
  const out = {};
  for (const name of NUMBER_FIELDS) {
    const el = field(name);
    // what the browser cannot read as a number ("1e", "0.5.") reads as empty: say so, do not send without it
    if (el.validity.badInput) throw new UserError(`Settings: ${name.replace("_", " ")} is not a number; correct or clear it.`);
    if (el.value.trim() === "") continue;
    const value = Number(el.value);
    if (!Number.isFinite(value)) throw new UserError(`Settings: ${name.replace("_", " ")} must be a number.`);
    out[name] = ["top_k", "num_beams", "max_tokens", "seed"].includes(name) ? Math.round(value) : value;
  }
  return out;
}

// -- audio in -----------------------------------------------------------------------------------------------
async function attachFile(file) {
  if (!file) return;
  hideError();
  try {
    if (file.size === 0) throw new UserError(`"${file.name}" is empty.`);
    if (file.size * 4 / 3 > state.config.max_body_bytes) {
      throw new UserError(`"${file.name}" is ${mb(file.size)}; this server takes requests of at most ` +
                          `${mb(state.config.max_body_bytes)}. Upload a shorter or compressed file.`);
    }
    const bytes = new Uint8Array(await file.arrayBuffer());
    const seconds = await duration(bytes); // null: the browser cannot decode it; the server will judge
    if (seconds !== null && seconds === 0) throw new UserError(`"${file.name}" holds no audio.`);
    if (seconds === null && !looksLikeMedia(file)) {
      throw new UserError(`"${file.name}" does not look like an audio file (${file.type || "unknown type"}); ` +
                          "upload a recording: wav, flac, mp3, ogg, opus, m4a or webm.");
    }
    // alone here (a transcript takes it whatever the conversation holds); with the conversation's audio at Send
    if (seconds !== null) checkLength(seconds, `"${file.name}"`, 0);
    setAttachment({ b64: base64(bytes), format: formatOf(file), url: URL.createObjectURL(file), name: file.name,
                    seconds });
    $("text").focus();
  } catch (err) {
    showError(err instanceof UserError ? err.message : `Could not read "${file.name}": ${err.message}`);
  }
}

async function duration(bytes) {
  try {
    const ctx = new OfflineAudioContext(1, 1, SAMPLE_RATE);
    const buffer = await ctx.decodeAudioData(bytes.slice().buffer);
    return buffer.duration;
  } catch (_) {
    return null;
  }
}

/** A UserError if this much audio would take the conversation past the server's limit per request. */
function checkLength(seconds, what, earlier = earlierAudio()) {
  const limit = state.config.max_audio_seconds;
  // tenths, rounded up, where a length is over: 2.04 s over a 2 s limit reads "0:02.1", not "0:02.0"
  const over = (s) => stamp(Math.ceil(s * 10) / 10);
  const most = Number.isInteger(limit) ? clock(limit) : stamp(limit);
  if (seconds > limit) {
    throw new UserError(`${what} is ${over(seconds)} long; this server takes at most ${most} of audio.`);
  }
  if (earlier + seconds > limit) {
    throw new UserError(`${what} (${over(seconds)}) with the conversation's earlier audio (${stamp(earlier)}) is ` +
                        `more than the ${most} this server takes: start a new chat.`);
  }
}

/** An audio or video file by its type or its name (what the browser cannot play, the server may decode). */
function looksLikeMedia(file) {
  if (/^(audio|video)\//.test(file.type)) return true;
  return /\.(wav|flac|mp3|ogg|oga|opus|m4a|aac|webm|mp4|aiff?|wma|amr|caf|mka|mkv)$/i.test(file.name);
}

function formatOf(file) {
  const ext = (file.name.split(".").pop() || "").toLowerCase();
  if (ext && ext !== file.name.toLowerCase()) return ext;
  return (file.type.split("/")[1] || "wav").split(";")[0];
}

function setAttachment(audio) {
  if (state.attachment && state.attachment !== audio && !state.history.some((t) => t.audio === state.attachment)) {
    URL.revokeObjectURL(state.attachment.url);
  }
  state.attachment = audio;
  $("attachment").hidden = !audio;
  $("attachment-audio").src = audio ? audio.url : "";
  $("attachment-name").textContent = audio ? `${audio.name}${audio.seconds ? ` · ${clock(audio.seconds)}` : ""}` : "";
}

function wireDrop() {
  let depth = 0;
  const overlay = $("drop");
  const hasFiles = (e) => e.dataTransfer && Array.from(e.dataTransfer.types).includes("Files");
  window.addEventListener("dragenter", (e) => { if (hasFiles(e)) { depth++; overlay.hidden = false; } });
  window.addEventListener("dragleave", () => { if (--depth <= 0) { depth = 0; overlay.hidden = true; } });
  window.addEventListener("dragover", (e) => { if (hasFiles(e)) e.preventDefault(); });
  window.addEventListener("drop", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    depth = 0;
    overlay.hidden = true;
    attachFile(e.dataTransfer.files[0]);
  });
}

// -- the microphone -----------------------------------------------------------------------------------------
async function startRecording() {
  state.micBusy = true;
  try { await openMicrophone(); } finally { state.micBusy = false; }
}

async function openMicrophone() {
  hideError();
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    showError("The browser allows the microphone only on a secure page: open this page as " +
              `http://localhost:${location.port || 80}/ on the server's machine, or serve it over HTTPS.`);
    return;
  }
  let stream;
  try {
    // Raw sound: the model was trained on unprocessed audio, and nothing plays while recording.
    stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false } });
  } catch (err) {
    const refused = err.name === "NotAllowedError" || err.name === "SecurityError";
    const missing = err.name === "NotFoundError" || err.name === "OverconstrainedError";
    showError(refused ? "Microphone access was refused: allow it in the browser's site settings, or upload a file."
              : missing ? "No microphone was found: connect one, or upload a file."
              : `The microphone could not be opened (${err.name}): ${err.message}`);
    return;
  }
  const ctx = new AudioContext();
  try {
    await ctx.audioWorklet.addModule("/web/recorder-worklet.js");
  } catch (err) {
    stream.getTracks().forEach((t) => t.stop());
    ctx.close();
    showError(`Recording is not available in this browser (${err.message}); upload a file instead.`);
    return;
  }
  const node = new AudioWorkletNode(ctx, "recorder");
  const rec = { ctx, stream, node, chunks: [], samples: 0 };
  node.port.onmessage = (e) => onAudio(rec, e.data);
  ctx.createMediaStreamSource(stream).connect(node);
  node.connect(ctx.destination); // it writes silence; connected so that the browser keeps it running
  state.recorder = rec;
  $("recording").hidden = false;
  $("mic").setAttribute("aria-pressed", "true");
  $("mic").title = "Stop and send";
  $("mic").setAttribute("aria-label", "Stop and send the recording");
}

function onAudio(rec, block) {
  if (state.recorder !== rec) return;
  rec.chunks.push(block);
  rec.samples += block.length;
  let sum = 0;
  for (let i = 0; i < block.length; i++) sum += block[i] * block[i];
  $("recording-level").value = Math.min(1, Math.sqrt(sum / block.length) * 4);
  const seconds = rec.samples / rec.ctx.sampleRate;
  $("recording-time").textContent = clock(seconds);
  if (seconds >= audioLeft()) finishRecording("send"); // the conversation's earlier audio counts too
}

/** Seconds of audio the server still takes in this conversation (its limit covers the whole request), the
 * audio attached counted: a recording sent goes with it. */
function audioLeft() {
  return state.config.max_audio_seconds - earlierAudio() - (state.attachment ? totalSeconds([state.attachment]) : 0);
}

/** Seconds of audio the conversation's turns hold so far. */
function earlierAudio() {
  return state.history.reduce((sum, t) => sum + totalSeconds(clips(t)), 0);
}

/** A user turn's audio: the file (or recording) attached, then the question recorded beside it. */
function clips(turn) { return [turn.audio, turn.voice].filter(Boolean); }

function totalSeconds(audios) { return audios.reduce((sum, a) => sum + (a.seconds || 0), 0); }

/** Stop recording. "send": the recording is the turn (voice chat); "keep": it stays attached, to type a question
 * about it or to transcribe it; "cancel": it is thrown away. */
async function finishRecording(how) {
  const rec = state.recorder;
  if (!rec) return;
  state.recorder = null;
  state.micBusy = true;
  try { await closeRecording(rec, how); } finally { state.micBusy = false; }
}

async function closeRecording(rec, how) {
  rec.stream.getTracks().forEach((t) => t.stop());
  rec.node.port.onmessage = null;
  const rate = rec.ctx.sampleRate;
  await rec.ctx.close();
  $("recording").hidden = true;
  $("mic").setAttribute("aria-pressed", "false");
  $("mic").title = "Record (press again to send)";
  $("mic").setAttribute("aria-label", "Record");
  if (how === "cancel") return;
  // the last block may run past what is left by a few samples: the recording ends where the limit is
  const samples = Math.max(0, Math.min(rec.samples, Math.floor(audioLeft() * rate)));
  const seconds = samples / rate;
  let recording;
  try {
    if (seconds < MIN_RECORDING_SECONDS) {
      throw new UserError(audioLeft() < MIN_RECORDING_SECONDS
        ? "This conversation has used all the audio this server takes: start a new chat."
        : "The recording is too short: hold on a little longer.");
    }
    checkLength(seconds, "The recording");
    const pcm = await resample(concat(rec.chunks, rec.samples).subarray(0, samples), rate, SAMPLE_RATE);
    const wav = new Blob([encodeWav(pcm, SAMPLE_RATE)], { type: "audio/wav" });
    const bytes = new Uint8Array(await wav.arrayBuffer());
    recording = { b64: base64(bytes), format: "wav", url: URL.createObjectURL(wav), name: "recording", seconds };
  } catch (err) {
    showError(err instanceof UserError ? err.message : `The recording could not be prepared: ${err.message}`);
    return;
  }
  // a question asked aloud about the audio attached: both go, that audio first (it was replaced, never sent)
  if (how === "send" && state.attachment) {
    send(recording);
    return;
  }
  setAttachment(recording);
  if (how === "keep") {
    $("text").focus();
    return;
  }
  send(); // voice chat: the recording is the turn (with whatever was typed beside it)
}

function concat(chunks, total) {
  const out = new Float32Array(total);
  let at = 0;
  for (const c of chunks) { out.set(c, at); at += c.length; }
  return out;
}

async function resample(pcm, from, to) {
  if (from === to) return pcm;
  const ctx = new OfflineAudioContext(1, Math.max(1, Math.ceil(pcm.length * to / from)), to);
  const buffer = ctx.createBuffer(1, pcm.length, from);
  buffer.copyToChannel(pcm, 0);
  const source = ctx.createBufferSource();
  source.buffer = buffer;
  source.connect(ctx.destination);
  source.start();
  return (await ctx.startRendering()).getChannelData(0);
}

function encodeWav(pcm, rate) {
  const view = new DataView(new ArrayBuffer(44 + pcm.length * 2));
  const text = (at, s) => { for (let i = 0; i < s.length; i++) view.setUint8(at + i, s.charCodeAt(i)); };
  text(0, "RIFF"); view.setUint32(4, 36 + pcm.length * 2, true); text(8, "WAVE");
  text(12, "fmt "); view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, 1, true);
  view.setUint32(24, rate, true); view.setUint32(28, rate * 2, true); view.setUint16(32, 2, true);
  view.setUint16(34, 16, true); text(36, "data"); view.setUint32(40, pcm.length * 2, true);
  for (let i = 0; i < pcm.length; i++) {
    const s = Math.max(-1, Math.min(1, pcm[i]));
    view.setInt16(44 + i * 2, s < 0 ? s * 0x8000 : s * 0x7fff, true);
  }
  return view.buffer;
}

// -- a turn -------------------------------------------------------------------------------------------------
/** Send the turn being composed; ``voice``: a recording that goes with the audio attached, after it. */
async function send(voice = null) {
  if (state.recorder) { // Send (or Enter) while recording: the recording is the turn, as the microphone button
    if (!state.controller) finishRecording("send");
    return;
  }
  if (state.controller) return;
  const text = $("text").value.trim();
  const audio = state.attachment;
  if (!text && !audio) return;
  hideError();
  let body;
  const user = { role: "user", text, audio, voice };
  const history = state.history; // "New chat" replaces it: this turn's ending then goes nowhere
  try {
    const what = audio && (audio.name === "recording" ? "The recording" : `"${audio.name}"`);
    const seconds = totalSeconds(clips(user));
    if (seconds) checkLength(seconds, voice ? `${what} with the spoken question` : what);
    body = JSON.stringify(request([...state.history, user]));
  } catch (err) {
    showError(err.message);
    return;
  }
  state.history.push(user);
  const userView = renderTurn(user);
  $("text").value = "";
  autoGrow();
  setAttachment(null);
  const answer = { role: "assistant", text: "" };
  const answerView = renderTurn(answer);
  const bubble = answerView.querySelector(".bubble");
  bubble.classList.add("pending");
  const controller = new AbortController();
  setBusy(controller);
  const started = performance.now();
  let first = null;
  let usage = null;
  const entries = []; // the tokens' logprobs, when "Show how sure" asked for them
  let finish = null;
  try {
    const res = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body,
                                                       signal: controller.signal });
    if (!res.ok) throw await responseError(res);
    audioWarning(res, "Answered");
    for await (const event of events(res.body)) {
      if (event.error) throw new UserError(`The answer broke off: ${event.error.message}`);
      if (event.usage) usage = event.usage;
      const choice = event.choices && event.choices[0];
      if (choice && choice.logprobs && choice.logprobs.content) entries.push(...choice.logprobs.content);
      if (choice && choice.finish_reason) finish = choice.finish_reason;
      const delta = choice && choice.delta && choice.delta.content;
      if (delta) {
        if (first === null) first = performance.now();
        answer.text += delta;
        bubble.textContent = answer.text;
        scrollDown();
      }
    }
    // every choice ends with its finish_reason: a stream that ends without one was cut (a proxy, the network)
    if (finish === null) throw new UserError("The answer broke off before its end; ask again.");
    history.push(answer);
    if (entries.length) shade(bubble, entries, finish, answer.text);
    meta(answerView, usage, started, first, finish);
    announce(answer.text);
    if (finish === "abort") {
      bubble.classList.add("failed");
      showError("The server stopped this answer before its end (it is shutting down): ask again once it is back.");
    }
  } catch (err) {
    const stopped = err.name === "AbortError";
    let lost = "";
    if (history !== state.history) return; // a new chat began: nothing of this turn belongs to it
    if (answer.text) { // keep what was said: it is part of the conversation now
      history.push(answer);
      bubble.classList.add(stopped ? "stopped" : "failed");
    } else { // nothing came: undo the turn and give its text and audio back
      history.pop();
      userView.remove();
      answerView.remove();
      if (!history.length) $("intro").hidden = false;
      lost = giveBack(text, audio, voice);
    }
    const said = [stopped ? "" : err instanceof UserError ? err.message : unreachable(err), lost].filter(Boolean);
    if (said.length) showError(said.join(" "));
  } finally {
    bubble.classList.remove("pending");
    setBusy(null);
  }
}

function request(turns) {
  const messages = [];
  const system = field("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  for (const turn of turns) {
    if (turn.role === "assistant") { messages.push({ role: "assistant", content: turn.text }); continue; }
    const content = [];
    for (const audio of clips(turn)) content.push({ type: "input_audio", input_audio: { data: audio.b64, format: audio.format } });
    if (turn.text) content.push({ type: "text", text: turn.text });
    messages.push({ role: "user", content });
  }
  const confidence = field("confidence").checked ? { logprobs: true } : {};
  return { model: state.config.model, messages, stream: true, stream_options: { include_usage: true }, ...confidence,
           ...sampling() };
}

function headers(json = true) {
  const out = json ? { "Content-Type": "application/json" } : {};
  const key = field("api_key").value.trim();
  if (key) out.Authorization = `Bearer ${key}`;
  return out;
}

// -- a transcript -------------------------------------------------------------------------------------------
/** The attached audio's transcript with times (the server cuts it into windows, at pauses where the model
 * asks for that, and leaves out what has no speech), streamed: the window being decoded shows its text as it
 * comes, then its times once it is done; at the end, the subtitles to download. Not a turn of the
 * conversation: the audio stays attached, to ask about it next. */
async function transcribe() {
  const audio = state.attachment;
  if (state.controller || state.recorder || !audio) return;
  hideError();
  const form = new FormData();
  const bytes = Uint8Array.from(atob(audio.b64), (c) => c.charCodeAt(0));
  const name = audio.name || "audio";
  form.append("file", new Blob([bytes]), /\.[^.]+$/.test(name) ? name : `${name}.${audio.format}`);
  form.append("model", state.config.model);
  form.append("response_format", "verbose_json");
  form.append("stream", "true");
  const language = field("language").value.trim();
  if (language) form.append("language", language);
  const view = renderTurn({ role: "assistant", text: "" });
  view.classList.add("transcript");
  const bubble = view.querySelector(".bubble");
  bubble.classList.add("pending");
  const title = Object.assign(document.createElement("div"), { className: "title",
                                                               textContent: `Transcribing ${name}…` });
  const controller = new AbortController();
  setBusy(controller);
  const started = performance.now();
  const segments = []; // transcript.text.segment events: id, start, end, text
  let live = null; // the line of the window being decoded, and its text so far
  let done = null;
  try {
    const res = await fetch("/v1/audio/transcriptions", { method: "POST", headers: headers(false), body: form,
                                                         signal: controller.signal });
    if (!res.ok) throw await responseError(res);
    audioWarning(res, "Transcribed");
    bubble.replaceChildren(title);
    for await (const event of events(res.body)) {
      if (event.error) throw new UserError(`The transcript broke off: ${event.error.message}`);
      if (event.type === "transcript.text.delta") {
        if (!live) {
          live = { line: segmentLine("…", ""), text: "" };
          live.line.classList.add("live");
          bubble.append(live.line);
        }
        live.text += event.delta; // a window after the first begins with the space that joins it
        live.line.lastChild.textContent = live.text.trim();
      } else if (event.type === "transcript.text.segment") {
        segments.push(event);
        const line = event.text ? segmentLine(`${stamp(event.start)}–${stamp(event.end)}`, event.text) : null;
        if (live) live.line.replaceWith(...(line ? [line] : []));
        else if (line) bubble.append(line);
        live = null;
      } else if (event.type === "transcript.text.done") {
        done = event;
      }
      scrollDown();
    }
    if (!done) throw new UserError("The transcript broke off before its end; try again.");
    title.textContent = `Transcript of ${name} (${clock(done.duration)})`;
    if (!segments.some((s) => s.text)) {
      bubble.append(Object.assign(document.createElement("div"), { textContent: "No speech was found." }));
    }
    const links = document.createElement("div");
    links.className = "meta";
    const base = name.replace(/\.[^.]+$/, "");
    const spoken = segments.filter((s) => s.text).length;
    const took = `${((performance.now() - started) / 1000).toFixed(1)} s`;
    links.append(`${spoken} ${spoken === 1 ? "segment" : "segments"} · ${took}${spoken ? " · download " : ""}`);
    for (const [kind, text] of spoken ? [["srt", subtitles(segments, "srt")], ["vtt", subtitles(segments, "vtt")],
                                         ["txt", `${done.text}\n`]] : []) {
      const url = URL.createObjectURL(new Blob([text], { type: "text/plain" }));
      state.downloads.push(url);
      links.append(Object.assign(document.createElement("a"), { href: url, download: `${base}.${kind}`,
                                                                className: kind, textContent: `.${kind}` }), " ");
    }
    view.append(links);
    announce(spoken ? `Transcript of ${name}: ${done.text}` : `No speech was found in ${name}.`);
    scrollDown();
  } catch (err) {
    const stopped = err.name === "AbortError";
    if (segments.length || live) { // keep what was transcribed, marked as cut short
      title.textContent = `Part of the transcript of ${name}`;
      bubble.classList.add(stopped ? "stopped" : "failed");
    } else {
      view.remove();
    }
    if (!stopped) showError(err instanceof UserError ? err.message : unreachable(err));
  } finally {
    bubble.classList.remove("pending");
    setBusy(null);
  }
}

/** A line of a transcript: its times (or "…" while it is decoded) and its text. */
function segmentLine(times, text) {
  const line = document.createElement("div");
  line.className = "segment";
  const time = document.createElement("span");
  time.className = "time";
  time.textContent = times;
  line.append(time, document.createTextNode(text));
  return line;
}

/** Segments as SubRip or WebVTT cues, as the server writes them (a cue per segment with text, on one line). */
function subtitles(segments, kind) {
  const cues = segments.map((s) => ({ ...s, text: s.text.split(PY_WHITESPACE).filter(Boolean).join(" ").replaceAll("-->", "->") }))
    .filter((s) => s.text);
  const time = (t) => stamp(t, true).replace(".", kind === "srt" ? "," : ".");
  if (kind === "srt") return cues.map((s, i) => `${i + 1}\n${time(s.start)} --> ${time(s.end)}\n${s.text}\n\n`).join("");
  const escape = (t) => t.replaceAll("&", "&amp;").replaceAll("<", "&lt;").replaceAll(">", "&gt;");
  return "WEBVTT\n\n" + cues.map((s) => `${time(s.start)} --> ${time(s.end)}\n${escape(s.text)}\n\n`).join("");
}

/** 83.25 -> "1:23.3"; full: "00:01:23.250" (hours, minutes, seconds, milliseconds). */
function stamp(seconds, full = false) {
  if (!full) {
    const tenths = Math.round(seconds * 10); // 59.96 -> "1:00.0", not "0:60.0"
    return `${Math.floor(tenths / 600)}:${((tenths % 600) / 10).toFixed(1).padStart(4, "0")}`;
  }
  const ms = Math.round(seconds * 1000);
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  return `${pad(Math.floor(ms / 3600000))}:${pad(Math.floor(ms / 60000) % 60)}:${pad(Math.floor(ms / 1000) % 60)}.${pad(ms % 1000, 3)}`;
}

/** Server-sent events -> their JSON payloads, until [DONE]. */
async function* events(stream) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

async function responseError(res) {
  const body = await res.json().catch(() => null);
  const message = (body && body.error && body.error.message) || `${res.status} ${res.statusText}`;
  const retry = res.headers.get("Retry-After");
  switch (res.status) {
    case 401:
      toggleSettings(true, field("api_key"));
      return new UserError(`The server needs a valid API key: enter it in Settings (${message}).`);
    case 413:
      return new UserError(`Too much for this server: ${message}. Send shorter audio, or start a new chat.`);
    case 429:
      return new UserError(`The server is busy (${message}). Try again${retry ? ` in ${retry} s` : " shortly"}.`);
    case 503:
      return new UserError(`The server is not ready (${message}). Try again${retry ? ` in ${retry} s` : " shortly"}.`);
    default:
      return new UserError(res.status >= 500 ? `The server failed: ${message}` : message);
  }
}

/** What the server says of the audio it used (a file cut short: answered or transcribed from what arrived). */
function audioWarning(res, done) {
  const warning = res.headers.get("X-Audio-Warning");
  if (warning) showError(`${done} from the part of the audio that arrived: ${warning}`);
}

/** A turn that got no answer goes back to the composer; a draft written meanwhile is kept beside it. Returns
 * what could not go back (the composer holds one audio), to be said with the error: "" when all did. */
function giveBack(text, audio, voice) {
  const draft = $("text").value;
  if (text && draft !== text) $("text").value = draft ? `${text}\n${draft}` : text;
  autoGrow();
  const lost = [];
  if (audio && !state.attachment) setAttachment(audio);
  else if (audio && state.attachment !== audio) {
    lost.push("The question's audio could not go back beside the file attached since: attach it again.");
  }
  if (voice) lost.push("The question spoken about the file could not go back with it: ask it again.");
  return lost.join(" ");
}

function unreachable(err) {
  return `Cannot reach the server (${err.message}): is qwen2audio serve still running?`;
}

// -- the page -----------------------------------------------------------------------------------------------
function renderTurn(turn) {
  $("intro").hidden = true;
  const view = document.createElement("section");
  view.className = `turn ${turn.role}`;
  for (const audio of clips(turn)) {
    const player = document.createElement("audio");
    player.controls = true;
    player.preload = "metadata";
    player.src = audio.url;
    view.append(player);
  }
  if (turn.text || turn.role === "assistant") {
    const bubble = document.createElement("div");
    bubble.className = "bubble";
    bubble.textContent = turn.text; // text, never HTML
    view.append(bubble);
  }
  $("conversation").append(view);
  scrollDown();
  return view;
}

/** The answer again as one span per token, shaded by how unlikely the model found it (its probability on
 * hover). Tokens are decoded from their bytes (a character may span two); the stop token is left out. If
 * the spans do not spell the answer exactly, it stays as plain text. */
function shade(bubble, entries, finish, text) {
  const tokens = finish === "stop" ? entries.slice(0, -1) : entries;
  const decoder = new TextDecoder();
  const spans = tokens.map((entry) => {
    const span = document.createElement("span");
    span.className = "tok";
    span.textContent = decoder.decode(new Uint8Array(entry.bytes), { stream: true });
    const p = Math.exp(entry.logprob);
    span.style.setProperty("--doubt", (1 - p).toFixed(3));
    span.title = `p = ${p.toFixed(3)}`;
    return span;
  });
  const tail = decoder.decode();
  if (tail && spans.length) spans[spans.length - 1].textContent += tail;
  if (spans.map((s) => s.textContent).join("") !== text) return;
  bubble.replaceChildren(...spans);
}

function meta(view, usage, started, first, finish) {
  if (!usage) return;
  const line = document.createElement("div");
  line.className = "meta";
  const end = performance.now();
  const perSecond = first !== null && usage.completion_tokens > 1 && end > first
    ? ` · ${((usage.completion_tokens - 1) / ((end - first) / 1000)).toFixed(1)} tokens/s` : "";
  const firstToken = first !== null ? ` · first token ${((first - started) / 1000).toFixed(2)} s` : "";
  const cut = finish === "length" ? " · cut at the most tokens allowed (Settings: Max tokens)" : "";
  line.textContent = `${usage.completion_tokens} tokens${firstToken}${perSecond}${cut}`;
  view.append(line);
}

function setBusy(controller) {
  const active = document.activeElement;
  state.controller = controller;
  $("send").hidden = !!controller;
  $("stop").hidden = !controller;
  $("mic").disabled = !!controller;
  $("transcribe").disabled = !!controller;
  // the control just used is hidden or disabled now, which sends the keyboard back to the page's start: Send
  // hands it to Stop in its place, the end of an answer to the message box (not on touch screens, where
  // that would open the on-screen keyboard)
  if (!active || !["send", "stop", "mic", "transcribe"].includes(active.id)) return;
  if (controller) $("stop").focus();
  else if (matchMedia("(pointer: fine)").matches) $("text").focus();
}

function newChat() {
  if (state.controller) state.controller.abort();
  if (state.recorder) finishRecording("cancel");
  for (const turn of state.history) for (const audio of clips(turn)) URL.revokeObjectURL(audio.url);
  for (const url of state.downloads) URL.revokeObjectURL(url);
  state.history = [];
  state.downloads = [];
  for (const view of document.querySelectorAll(".turn")) view.remove();
  $("intro").hidden = false;
  hideError();
}

/** Said once by a screen reader (the conversation itself is not a live region: it would read each token). */
function announce(text) { $("announce").textContent = text; }

function showError(message) {
  $("error-text").textContent = message;
  $("error").hidden = false;
}

function hideError() { $("error").hidden = true; }

function scrollDown() { const c = $("conversation"); c.scrollTop = c.scrollHeight; }

function autoGrow() { const t = $("text"); t.style.height = "auto"; t.style.height = `${t.scrollHeight}px`; }

class UserError extends Error {}

// -- small helpers ------------------------------------------------------------------------------------------
function base64(bytes) {
  let binary = "";
  const step = 0x8000;
  for (let i = 0; i < bytes.length; i += step) binary += String.fromCharCode.apply(null, bytes.subarray(i, i + step));
  return btoa(binary);
}

/** 36.87 -> "0:36": whole seconds gone by, as the browser's audio player counts them. */
function clock(seconds) {
  const s = Math.floor(seconds);
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}

function mb(bytes) { return `${(bytes / (1 << 20)).toFixed(1)} MB`; }
