// The draw-a-digit page: draw on the canvas, POST it as a PNG to /predict, show the answer, and send the
// true label to /feedback. Plain JS, no framework, nothing fetched but this server's own endpoints.
"use strict";

const STROKE_WIDTH = 18; // canvas pixels of a 280 px pad: about an MNIST pen stroke once scaled to 28 px
const $ = (id) => document.getElementById(id);
const pad = $("pad");
const ctx = pad.getContext("2d");
let drawing = false;
let hasInk = false;
let current = null; // the answer shown: {prediction_id, digit, ...}

// What POST /feedback needs here, told by the server in the page's <meta> tags (serving/guards.py): the bearer
// token where the operator lets the page have it, or that the server wants a token the page is not given.
const metaContent = (name) => document.querySelector(`meta[name="${name}"]`)?.content || null;
const feedbackToken = metaContent("mnist-feedback-token");
const feedbackWithheld = metaContent("mnist-feedback-auth") === "withheld";

// A stable key per browser, so an A/B test keeps showing this person the same model.
function clientKey() {
  try {
    let key = localStorage.getItem("mnist-client-key");
    if (!key) {
      key = Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
      localStorage.setItem("mnist-client-key", key);
    }
    return key;
  } catch (error) {
    return null; // storage disabled: a random arm per request
  }
}

function resetPad() {
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, pad.width, pad.height);
  ctx.lineWidth = STROKE_WIDTH;
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  ctx.strokeStyle = "#000";
  hasInk = false;
}

function point(event) {
  const box = pad.getBoundingClientRect();
  return [(event.clientX - box.left) * (pad.width / box.width), (event.clientY - box.top) * (pad.height / box.height)];
}

function startStroke(event) {
  event.preventDefault();
  pad.setPointerCapture(event.pointerId);
  drawing = true;
  const [x, y] = point(event);
  ctx.beginPath();
  ctx.moveTo(x, y);
  ctx.lineTo(x, y); // a dot is ink too
  ctx.stroke();
  hasInk = true;
}

function continueStroke(event) {
  if (!drawing) return;
  const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
  for (const each of events.length ? events : [event]) {
    const [x, y] = point(each);
    ctx.lineTo(x, y);
  }
  ctx.stroke();
}

function endStroke() {
  if (!drawing) return;
  drawing = false;
  predict();
}

function say(message) {
  $("status").textContent = message;
}

async function refusalText(response) {
  try {
    return (await response.json()).detail || response.statusText;
  } catch (error) {
    return response.statusText;
  }
}

async function predict() {
  if (!hasInk) {
    say("Draw a digit first.");
    return;
  }
  const png = await new Promise((resolve) => pad.toBlob(resolve, "image/png"));
  const headers = { "Content-Type": "image/png" };
  const key = clientKey();
  if (key) headers["X-Client-Key"] = key;
  say("Reading your digit…");
  try {
    const response = await fetch("/predict", { method: "POST", headers, body: png });
    if (!response.ok) {
      say(`The server could not read it: ${await refusalText(response)}`);
      return;
    }
    show(await response.json());
    say("");
  } catch (error) {
    say(`The server is not reachable (${error.message}).`);
  }
}

function show(answer) {
  current = answer;
  $("result").dataset.predictionId = answer.prediction_id;
  $("digit").textContent = answer.digit;
  $("arm").textContent = answer.arm;
  $("version").textContent = answer.model_version;
  $("confidence").textContent = percent(answer.confidence);
  $("correct").textContent = `Correct (${answer.digit})`;
  $("bars").replaceChildren(...answer.probabilities.map((p, digit) => bar(digit, p, digit === answer.digit)));
  setFeedbackEnabled(true);
  $("result").hidden = false;
}

function percent(p) {
  return `${(p * 100).toFixed(1)}%`;
}

function bar(digit, probability, top) {
  const item = document.createElement("li");
  item.className = top ? "bar top" : "bar";
  item.setAttribute("aria-label", `${digit}: ${percent(probability)}`);
  const label = document.createElement("span");
  label.textContent = digit;
  const track = document.createElement("span");
  track.className = "track";
  const fill = document.createElement("span");
  fill.className = "fill";
  fill.style.display = "block";
  fill.style.width = `${Math.max(0, Math.min(1, probability)) * 100}%`;
  track.append(fill);
  const value = document.createElement("span");
  value.className = "value";
  value.textContent = percent(probability);
  item.append(label, track, value);
  return item;
}

function setFeedbackEnabled(enabled) {
  for (const button of document.querySelectorAll("#correct, #picker button")) button.disabled = !enabled;
}

async function sendFeedback(label) {
  if (!current) return;
  setFeedbackEnabled(false);
  try {
    const headers = { "Content-Type": "application/json" };
    const key = clientKey();
    if (key) headers["X-Client-Key"] = key; // the client the rate limit and feedback -> landing judge
    if (feedbackToken) headers.Authorization = `Bearer ${feedbackToken}`;
    const response = await fetch("/feedback", {
      method: "POST",
      headers,
      body: JSON.stringify({ prediction_id: current.prediction_id, label }),
    });
    if (!response.ok) {
      setFeedbackEnabled(true);
      say(`Feedback not recorded: ${await refusalText(response)}`);
      return;
    }
    say(`Thank you: recorded ${label} as the true digit.`);
  } catch (error) {
    setFeedbackEnabled(true);
    say(`The server is not reachable (${error.message}).`);
  }
}

function buildPicker() {
  const buttons = [];
  for (let digit = 0; digit <= 9; digit += 1) {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = digit;
    button.dataset.label = digit;
    button.setAttribute("aria-label", `It was ${digit}`);
    button.addEventListener("click", () => sendFeedback(digit));
    buttons.push(button);
  }
  $("picker").replaceChildren(...buttons);
}

function withholdFeedback() {
  // The server needs a token for feedback and does not give it to this page: no buttons that cannot work.
  for (const id of ["correct", "picker-title", "picker"]) $(id).style.display = "none"; // .picker sets display
  $("feedback-title").textContent = "Feedback needs a token on this server; this page is not given one.";
}

function clearAll() {
  resetPad();
  current = null;
  $("result").hidden = true;
  say("");
}

resetPad();
buildPicker();
if (feedbackWithheld) withholdFeedback();
pad.addEventListener("pointerdown", startStroke);
pad.addEventListener("pointermove", continueStroke);
pad.addEventListener("pointerup", endStroke);
pad.addEventListener("pointercancel", endStroke);
$("predict").addEventListener("click", predict);
$("clear").addEventListener("click", clearAll);
$("correct").addEventListener("click", () => current && sendFeedback(current.digit));
