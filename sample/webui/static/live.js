// Live mode on the txt2img tab: with the "Live" box ticked, every prompt edit (after a short pause in typing) starts a
// generation with the tab's settings, cancelling the one before, and the image is replaced in place. Meant for a fast
// model or sampler (e.g. LCM, 2-4 steps, CFG 1); live images are not saved. Loaded after app.js, whose tabs are built
// synchronously when it runs, and whose helpers (api, txt2imgPayload, showResults, state) it uses.
"use strict";

// A pause this long in typing counts as an edit. Shorter than the gap between keystrokes of steady typing (about
// 100-200 ms), so it mostly waits out bursts of key repeat and paste events, and every edit's image can start at once;
// a generation started mid-word is cancelled by the next keystroke (the interrupt takes effect within one UNet layer).
const LIVE_DEBOUNCE_MS = 50;

const live = { timer: null, sequence: 0, running: false, taskId: null, lastKeystroke: 0 };

async function liveGenerate() {
  const sequence = ++live.sequence;
  let payload;
  try {
    payload = Object.assign(txt2imgPayload(), { save_images: false, batch_size: 1, n_iter: 1,
                                                force_task_id: newTaskId() });
  } catch (error) {
    return;  // the settings are being edited; the next keystroke tries again
  }
  const keystroke = live.lastKeystroke;
  // Cancel the previous live generation by its task id: it stops whether it is running, queued, or its request is
  // still on its way (a plain interrupt would miss it then, and this edit would wait for the whole job).
  if (live.running) {
    await api("POST", `/sdapi/v1/interrupt?id_task=${encodeURIComponent(live.taskId)}`).catch(() => {});
  }
  if (sequence !== live.sequence) return;  // a newer edit arrived while interrupting
  live.running = true;
  live.taskId = payload.force_task_id;
  try {
    const response = await api("POST", "/sdapi/v1/txt2img", payload);
    if (sequence !== live.sequence) return;  // superseded: the newer request draws its own image
    const details = JSON.parse(response.info);
    if (!response.images.length) return;  // interrupted before an image was made
    state.results.txt2img = { images: response.images, infotexts: details.infotexts, info: details };
    state.lastInfo.txt2img = details;
    showResults("txt2img", 0);
    const latency = Math.round(performance.now() - keystroke);
    document.body.dataset.liveLatencyMs = String(latency);  // read by the browser test
    $("txt2img_html_log").textContent = `Live: drawn ${latency} ms after the last keystroke`;
  } catch (error) {
    if (sequence === live.sequence) {
      $("txt2img_html_info").textContent = error.message;
      $("txt2img_html_info").classList.add("error");
    }
  } finally {
    if (sequence === live.sequence) live.running = false;
  }
}

function setupLive() {
  const label = document.createElement("label");
  label.className = "live-toggle";
  label.title = "Generate on every prompt edit, replacing the image (use a fast model or sampler: LCM, 2-4 steps)";
  const box = document.createElement("input");
  box.type = "checkbox";
  box.id = "txt2img_live";
  label.append(box, " Live");
  $("txt2img_generate").after(label);
  $("txt2img_prompt").addEventListener("input", () => {
    if (!box.checked) return;
    live.lastKeystroke = performance.now();
    clearTimeout(live.timer);
    live.timer = setTimeout(liveGenerate, LIVE_DEBOUNCE_MS);
  });
  box.addEventListener("change", () => {
    if (box.checked) liveGenerate();
  });
}

setupLive();
