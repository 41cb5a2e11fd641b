// The page: builds the txt2img / img2img tabs from one template and talks to the server through the same
// /sdapi/v1 routes as any A1111 client, plus /internal/* helpers (token counts, per-task progress, save, zip).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { config: null, results: {}, selected: {}, lastInfo: {}, pngParameters: null };
// Other page scripts add to a generation request here: fn(tab, payload) changes the payload in place (throwing an
// Error shows its message instead of generating), e.g. controlnet.js's alwayson_scripts; and read pasted infotext
// here: fn(tab, parameters) after applyParameters has filled the tab's own fields.
const payloadExtensions = [];
const parameterExtensions = [];

async function api(method, url, body) {
  const response = await fetch(url, {
    method, headers: body === undefined ? {} : { "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!response.ok) {
    let detail = `${response.status} ${response.statusText}`;
    try { detail = (await response.json()).detail || detail; } catch (e) { /* not JSON */ }
    throw new Error(detail);
  }
  const type = response.headers.get("Content-Type") || "";
  return type.includes("application/json") ? response.json() : response.blob();
}

// ----- building the tabs ---------------------------------------------------------------------------------------

function buildTab(tab) {
  const fragment = $("generation_tab").content.cloneNode(true);
  const other = tab === "txt2img" ? "img2img" : "txt2img";
  fragment.querySelectorAll(`.only-${other}`).forEach((element) => element.remove());
  fragment.querySelectorAll("[id], [for], [name]").forEach((element) => {
    for (const attribute of ["id", "for", "name"]) {
      const value = element.getAttribute(attribute);
      if (value && value.startsWith("TAB_")) element.setAttribute(attribute, tab + value.slice(3));
    }
  });
  $(`tab_${tab}`).appendChild(fragment);
}

// A range slider and its number box show the same value; `value(id)` reads either through the slider.
function linkSliders(root) {
  root.querySelectorAll("label.slider").forEach((label) => {
    const range = label.querySelector("input[type=range]");
    const number = label.querySelector("input[type=number]");
    range.addEventListener("input", () => { number.value = range.value; });
    number.addEventListener("input", () => { range.value = number.value; });
  });
}

function setValue(id, value) {
  const element = $(id);
  if (!element || value === undefined || value === null) return;
  if (element.type === "checkbox") element.checked = Boolean(value);
  else element.value = value;
  element.dispatchEvent(new Event("input"));
}

const number = (id) => Number($(id).value);
const radio = (name) => document.querySelector(`input[name="${name}"]:checked`).value;

function fillSelect(select, items, selected) {
  select.innerHTML = "";
  for (const item of items) {
    const option = document.createElement("option");
    option.value = option.textContent = item;
    select.appendChild(option);
  }
  if (selected !== undefined) select.value = selected;
}

// ----- quicksettings ---------------------------------------------------------------------------------------------

const QUICKSETTINGS = ["sd_model_checkpoint", "sd_vae", "CLIP_stop_at_last_layers", "inpainting_mask_weight",
                       "initial_noise_multiplier"];

function showSettingStatus(text, isError) {
  const status = $("setting_status");
  status.textContent = text;
  status.classList.toggle("error", Boolean(isError));
}

async function loadModels() {
  const [models, vaes, options] = await Promise.all([
    api("GET", "/sdapi/v1/sd-models"), api("GET", "/sdapi/v1/sd-vae"), api("GET", "/sdapi/v1/options")]);
  fillSelect($("setting_sd_model_checkpoint"), models.map((m) => m.title), options.sd_model_checkpoint);
  fillSelect($("setting_sd_vae"), ["Automatic", ...vaes.map((v) => v.model_name)], options.sd_vae);
  for (const name of QUICKSETTINGS.slice(2)) setValue(`setting_${name}`, options[name]);
  return options;
}

function setupQuicksettings() {
  for (const name of QUICKSETTINGS) {
    const element = $(`setting_${name}`);
    const output = document.querySelector(`output[for="setting_${name}"]`);
    if (output) element.addEventListener("input", () => { output.textContent = element.value; });
    element.addEventListener("change", async () => {
      const value = element.type === "range" ? Number(element.value) : element.value;
      showSettingStatus(name === "sd_model_checkpoint" ? "Loading model…" : "Saving…");
      try {
        await api("POST", "/sdapi/v1/options", { [name]: value });
        showSettingStatus("");
      } catch (error) {
        showSettingStatus(error.message, true);
      }
    });
  }
  $("refresh_sd_model_checkpoint").addEventListener("click", async () => {
    await api("POST", "/sdapi/v1/refresh-checkpoints");
    await loadModels();
  });
}

// ----- prompts and token counters --------------------------------------------------------------------------------

function setupTokenCounter(textareaId, counterId, stepsId) {
  const textarea = $(textareaId), counter = $(counterId);
  let timer = null, sequence = 0;
  const update = async () => {
    const mine = ++sequence;
    try {
      const { used, limit } = await api("POST", "/internal/token-count",
                                        { text: textarea.value, steps: number(stepsId) });
      if (mine === sequence) {  // an older answer arriving late must not overwrite a newer one
        counter.textContent = `${used}/${limit}`;
        counter.classList.toggle("error", false);
      }
    } catch (error) {
      counter.textContent = "?";
      counter.classList.toggle("error", true);
      counter.title = error.message;
    }
  };
  textarea.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(update, 150); });
  update();
}

// ----- generation ------------------------------------------------------------------------------------------------

function newTaskId() {
  const bytes = crypto.getRandomValues(new Uint8Array(8));
  return `task(${Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("")})`;
}

function commonPayload(tab) {
  const showExtras = $(`${tab}_subseed_show`).checked;
  return {
    prompt: $(`${tab}_prompt`).value, negative_prompt: $(`${tab}_neg_prompt`).value.trim(),
    sampler_name: $(`${tab}_sampling`).value, scheduler: $(`${tab}_scheduler`).value,
    steps: number(`${tab}_steps`), width: number(`${tab}_width`), height: number(`${tab}_height`),
    n_iter: number(`${tab}_batch_count`), batch_size: number(`${tab}_batch_size`),
    cfg_scale: number(`${tab}_cfg_scale`), seed: number(`${tab}_seed`),
    subseed: showExtras ? number(`${tab}_subseed`) : -1,
    subseed_strength: showExtras ? number(`${tab}_subseed_strength`) : 0,
    seed_resize_from_w: showExtras ? number(`${tab}_seed_resize_from_w`) : 0,
    seed_resize_from_h: showExtras ? number(`${tab}_seed_resize_from_h`) : 0,
    restore_faces: $(`${tab}_restore_faces`).checked, tiling: $(`${tab}_tiling`).checked,
    styles: typeof selectedStyles === "function" ? selectedStyles(tab) : [],  // styles.js
    save_images: state.config.options.samples_save, send_images: true,
  };
}

function txt2imgPayload() {
  const payload = commonPayload("txt2img");
  if (typeof promptWithPreset === "function") payload.prompt = promptWithPreset(payload.prompt);  // presets.js
  if ($("txt2img_enable_hr").checked) {
    Object.assign(payload, {
      enable_hr: true, hr_upscaler: $("txt2img_hr_upscaler").value, hr_scale: number("txt2img_hr_scale"),
      hr_second_pass_steps: number("txt2img_hires_steps"), denoising_strength: number("txt2img_denoising_strength"),
    });
  }
  return payload;
}

function img2imgPayload() {
  const payload = commonPayload("img2img");
  const init = $("img2img_init");
  if (init.hidden || !init.src) {
    throw new Error("Choose an image for img2img first (drop one, or use Send to img2img).");
  }
  Object.assign(payload, {
    init_images: [init.src], denoising_strength: number("img2img_denoising_strength"),
    resize_mode: Number(radio("img2img_resize_mode")),
  });
  if (radio("img2img_mode") === "inpaint") {
    Object.assign(payload, {
      mask: maskDataUrl(), mask_blur: number("img2img_mask_blur"),
      inpainting_mask_invert: Number(radio("img2img_mask_mode")),
      inpainting_fill: Number(radio("img2img_inpainting_fill")),
      inpaint_full_res: radio("img2img_inpaint_full_res") === "1",
      inpaint_full_res_padding: number("img2img_inpaint_full_res_padding"),
    });
  }
  return payload;
}

function formatEta(seconds) {
  if (!(seconds > 0)) return "";
  const minutes = Math.floor(seconds / 60), rest = Math.round(seconds % 60);
  return minutes ? `ETA: ${minutes}m ${rest}s` : `ETA: ${rest}s`;
}

async function pollProgress(tab, taskId, isDone) {
  const bar = $(`${tab}_progress`), fill = bar.querySelector(".progress-fill");
  const text = bar.querySelector(".progress-text"), preview = $(`${tab}_preview`);
  while (!isDone()) {
    try {
      const progress = await api("POST", "/internal/progress", { id_task: taskId });
      if (isDone()) break;
      if (progress.queued) {
        text.textContent = progress.textinfo;
      } else if (progress.active) {
        fill.style.width = `${Math.round(progress.progress * 100)}%`;
        text.textContent = `${Math.round(progress.progress * 100)}% ${formatEta(progress.eta)}`;
        if (progress.live_preview) {
          preview.src = progress.live_preview;
          preview.hidden = false;
        }
      }
    } catch (error) { /* a missed poll is harmless; the next one catches up */ }
    await new Promise((resolve) => setTimeout(resolve, 400));
  }
}

async function generate(tab) {
  const root = $(`tab_${tab}`);
  if (root.classList.contains("running")) return;
  const log = $(`${tab}_html_log`), info = $(`${tab}_html_info`);
  let payload;
  try {
    payload = tab === "txt2img" ? txt2imgPayload() : img2imgPayload();
    for (const extend of payloadExtensions) extend(tab, payload);
  } catch (error) {
    info.textContent = error.message;
    info.classList.add("error");
    return;
  }
  payload.force_task_id = newTaskId();
  root.classList.add("running");
  $(`${tab}_progress`).hidden = false;
  $(`${tab}_progress`).querySelector(".progress-fill").style.width = "0";
  log.textContent = "";
  let done = false;
  const started = performance.now();
  const polling = pollProgress(tab, payload.force_task_id, () => done);
  try {
    const response = await api("POST", `/sdapi/v1/${tab}`, payload);
    const details = JSON.parse(response.info);
    state.results[tab] = { images: response.images, infotexts: details.infotexts, info: details };
    state.lastInfo[tab] = details;
    showResults(tab, 0);
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    log.textContent = `Time taken: ${seconds} s` + (details.interrupted ? " (interrupted)" : "");
  } catch (error) {
    info.textContent = error.message;
    info.classList.add("error");
  } finally {
    done = true;
    await polling;
    root.classList.remove("running");
    $(`${tab}_progress`).hidden = true;
    $(`${tab}_preview`).hidden = true;
  }
}

function showResults(tab, index) {
  const result = state.results[tab];
  const gallery = $(`${tab}_gallery`), info = $(`${tab}_html_info`);
  const main = gallery.querySelector(".selected-image"), thumbnails = gallery.querySelector(".thumbnails");
  thumbnails.innerHTML = "";
  result.images.forEach((data, i) => {
    const thumbnail = document.createElement("img");
    thumbnail.src = `data:image/png;base64,${data}`;
    thumbnail.classList.toggle("selected", i === index);
    thumbnail.addEventListener("click", () => showResults(tab, i));
    thumbnails.appendChild(thumbnail);
  });
  state.selected[tab] = index;
  info.classList.remove("error");
  if (!result.images.length) {
    main.hidden = true;
    info.textContent = "";
    return;
  }
  main.src = `data:image/png;base64,${result.images[index]}`;
  main.hidden = false;
  info.textContent = result.infotexts[index] || "";
}

function selectedImage(tab) {
  const result = state.results[tab];
  return result && result.images.length ? result.images[state.selected[tab] || 0] : null;
}

// ----- img2img input and inpaint mask ----------------------------------------------------------------------------

function setInitImage(dataUrl) {
  const init = $("img2img_init"), canvas = $("img2img_mask_canvas");
  return new Promise((resolve) => {
    init.onload = () => {
      canvas.width = init.naturalWidth;
      canvas.height = init.naturalHeight;
      canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
      $("img2img_image").classList.add("has-image");
      resolve();
    };
    init.src = dataUrl;
    init.hidden = false;
    updateInpaintVisibility();
  });
}

function setupMaskPainting() {
  const canvas = $("img2img_mask_canvas"), context = canvas.getContext("2d");
  let drawing = false;
  const paint = (event) => {
    const box = canvas.getBoundingClientRect();
    const x = (event.clientX - box.left) * canvas.width / box.width;
    const y = (event.clientY - box.top) * canvas.height / box.height;
    const radius = number("img2img_brush") * canvas.width / box.width / 2;
    context.fillStyle = "white";
    context.beginPath();
    context.arc(x, y, radius, 0, 2 * Math.PI);
    context.fill();
  };
  canvas.addEventListener("pointerdown", (event) => { drawing = true; paint(event); });
  canvas.addEventListener("pointermove", (event) => { if (drawing) paint(event); });
  window.addEventListener("pointerup", () => { drawing = false; });
  $("img2img_clear_mask").addEventListener("click", () => context.clearRect(0, 0, canvas.width, canvas.height));
}

// The mask as A1111 takes it: white where to inpaint, black elsewhere, the size of the init image.
function maskDataUrl() {
  const painted = $("img2img_mask_canvas");
  const mask = document.createElement("canvas");
  mask.width = painted.width;
  mask.height = painted.height;
  const context = mask.getContext("2d");
  context.fillStyle = "black";
  context.fillRect(0, 0, mask.width, mask.height);
  context.drawImage(painted, 0, 0);
  return mask.toDataURL("image/png");
}

function updateInpaintVisibility() {
  const inpaint = radio("img2img_mode") === "inpaint";
  document.querySelectorAll("#tab_img2img .only-inpaint").forEach((element) => { element.hidden = !inpaint; });
  $("img2img_mask_canvas").hidden = !inpaint || $("img2img_init").hidden;
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// ----- sending parameters between tabs ---------------------------------------------------------------------------

function switchTab(tab) {
  document.querySelectorAll("#tabs .tab").forEach((b) => b.classList.toggle("selected", b.dataset.tab === tab));
  document.querySelectorAll(".tab-page").forEach((page) => { page.hidden = page.id !== `tab_${tab}`; });
}

// Fills a tab from parsed infotext (png-info's `parameters`), as A1111's paste buttons do.
function applyParameters(tab, p) {
  const fields = {
    Prompt: "prompt", "Negative prompt": "neg_prompt", Steps: "steps", Sampler: "sampling",
    "Schedule type": "scheduler", "CFG scale": "cfg_scale", Seed: "seed", "Size-1": "width", "Size-2": "height",
    "Variation seed": "subseed", "Variation seed strength": "subseed_strength",
    "Seed resize from-1": "seed_resize_from_w", "Seed resize from-2": "seed_resize_from_h",
  };
  for (const [key, field] of Object.entries(fields)) {
    if (p[key] !== undefined) setValue(`${tab}_${field}`, p[key]);
  }
  // Older infotexts name the schedule inside the sampler ("DPM++ 2M Karras"), as A1111 once did.
  const sampler = p.Sampler || "";
  if (sampler && !state.config.samplers.includes(sampler)) {
    const schedule = state.config.schedulers.find((name) => sampler.endsWith(" " + name));
    if (schedule) {
      setValue(`${tab}_sampling`, sampler.slice(0, -schedule.length - 1));
      setValue(`${tab}_scheduler`, schedule);
    }
  }
  if (p["Variation seed"] !== undefined) setValue(`${tab}_subseed_show`, true);
  $(`${tab}_seed_extras`).hidden = !$(`${tab}_subseed_show`).checked;
  if (p.Tiling !== undefined) setValue(`${tab}_tiling`, p.Tiling === "True");
  if (tab === "img2img" && p["Denoising strength"] !== undefined && p["Hires upscale"] === undefined) {
    setValue("img2img_denoising_strength", p["Denoising strength"]);
  }
  if (tab === "txt2img") {
    const hires = p["Hires upscale"] !== undefined;
    setValue("txt2img_enable_hr", hires);
    $("txt2img_hr_options").hidden = !hires;
    if (hires) {
      setValue("txt2img_hr_scale", p["Hires upscale"]);
      setValue("txt2img_hr_upscaler", p["Hires upscaler"]);
      setValue("txt2img_hires_steps", p["Hires steps"] || 0);
      setValue("txt2img_denoising_strength", p["Denoising strength"]);
    }
  }
  if (p["Clip skip"] !== undefined && Number(p["Clip skip"]) !== number("setting_CLIP_stop_at_last_layers")) {
    setValue("setting_CLIP_stop_at_last_layers", p["Clip skip"]);
    $("setting_CLIP_stop_at_last_layers").dispatchEvent(new Event("change"));
  }
  for (const apply of parameterExtensions) apply(tab, p);
}

async function sendImageTo(mode, base64Png) {
  const dataUrl = `data:image/png;base64,${base64Png}`;
  const checked = document.querySelector(`input[name="img2img_mode"][value="${mode}"]`);
  checked.checked = true;
  await setInitImage(dataUrl);
  try {
    const info = await api("POST", "/sdapi/v1/png-info", { image: dataUrl });
    if (info.info) applyParameters("img2img", info.parameters);
  } catch (error) { /* an image without parameters still goes over */ }
  switchTab("img2img");
}

// ----- wiring ----------------------------------------------------------------------------------------------------

function setupGenerationTab(tab) {
  const root = $(`tab_${tab}`);
  linkSliders(root);
  const config = state.config;
  fillSelect($(`${tab}_sampling`), config.samplers, "Euler a");
  fillSelect($(`${tab}_scheduler`), config.schedulers, "Automatic");
  // Sizes step by what the loaded model's VAE and UNet down-sampling can divide (/internal/config's size_step).
  for (const side of ["width", "height"]) {
    const range = $(`${tab}_${side}`);
    range.step = range.parentElement.querySelector("input[type=number]").step = config.size_step;
  }
  setValue(`${tab}_width`, config.width);
  setValue(`${tab}_height`, config.height);
  setupTokenCounter(`${tab}_prompt`, `${tab}_token_counter`, `${tab}_steps`);
  setupTokenCounter(`${tab}_neg_prompt`, `${tab}_negative_token_counter`, `${tab}_steps`);
  $(`${tab}_restore_faces_label`).title = config.restore_faces_reason;

  root.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      generate(tab);
    }
  });
  $(`${tab}_generate`).addEventListener("click", () => generate(tab));
  // A failed interrupt / skip needs no report: the job simply runs on, and the progress bar shows it.
  $(`${tab}_interrupt`).addEventListener("click", () => api("POST", "/sdapi/v1/interrupt").catch(() => {}));
  $(`${tab}_skip`).addEventListener("click", () => api("POST", "/sdapi/v1/skip").catch(() => {}));
  $(`${tab}_res_switch_btn`).addEventListener("click", () => {
    const width = $(`${tab}_width`).value;
    setValue(`${tab}_width`, $(`${tab}_height`).value);
    setValue(`${tab}_height`, width);
  });
  $(`${tab}_random_seed`).addEventListener("click", () => setValue(`${tab}_seed`, -1));
  $(`${tab}_random_subseed`).addEventListener("click", () => setValue(`${tab}_subseed`, -1));
  $(`${tab}_reuse_seed`).addEventListener("click", () => {
    const info = state.lastInfo[tab];
    if (info) setValue(`${tab}_seed`, info.all_seeds[state.selected[tab] || 0] ?? info.seed);
  });
  $(`${tab}_reuse_subseed`).addEventListener("click", () => {
    const info = state.lastInfo[tab];
    if (info) setValue(`${tab}_subseed`, info.all_subseeds[state.selected[tab] || 0] ?? info.subseed);
  });
  $(`${tab}_subseed_show`).addEventListener("change", (event) => {
    $(`${tab}_seed_extras`).hidden = !event.target.checked;
  });

  const log = $(`${tab}_html_log`);
  const galleryImages = () => (state.results[tab] ? state.results[tab].images : []);
  $(`${tab}_save`).addEventListener("click", async () => {
    const image = selectedImage(tab);
    if (!image) return;
    try {
      const { files } = await api("POST", "/internal/save", { images: [image] });
      log.textContent = `Saved: ${files.map((f) => f.split("/").pop()).join(", ")}`;
    } catch (error) { log.textContent = error.message; }
  });
  $(`${tab}_zip`).addEventListener("click", async () => {
    if (!galleryImages().length) return;
    try {
      const blob = await api("POST", "/internal/zip", { images: galleryImages() });
      const link = document.createElement("a");
      link.href = URL.createObjectURL(blob);
      link.download = "images.zip";
      link.click();
      log.textContent = `Zip: ${galleryImages().length} image(s)`;
    } catch (error) { log.textContent = error.message; }
  });
  $(`${tab}_send_to_img2img`).addEventListener("click", () => {
    const image = selectedImage(tab);
    if (image) sendImageTo("img2img", image);
  });
  $(`${tab}_send_to_inpaint`).addEventListener("click", () => {
    const image = selectedImage(tab);
    if (image) sendImageTo("inpaint", image);
  });
}

function setupTxt2imgExtras() {
  fillSelect($("txt2img_hr_upscaler"), state.config.upscalers, "Latent");
  $("txt2img_enable_hr").addEventListener("change", (event) => {
    $("txt2img_hr_options").hidden = !event.target.checked;
  });
}

function setupImg2imgExtras() {
  document.querySelectorAll('input[name="img2img_mode"]').forEach((input) => {
    input.addEventListener("change", updateInpaintVisibility);
  });
  $("img2img_file").addEventListener("change", async (event) => {
    if (event.target.files.length) await setInitImage(await readFile(event.target.files[0]));
  });
  setupMaskPainting();
  updateInpaintVisibility();
}

function setupPngInfo() {
  const html = $("pnginfo_html");
  $("pnginfo_file").addEventListener("change", async (event) => {
    if (!event.target.files.length) return;
    const dataUrl = await readFile(event.target.files[0]);
    $("pnginfo_preview").src = dataUrl;
    $("pnginfo_preview").hidden = false;
    $("pnginfo_image").classList.add("has-image");
    html.classList.remove("error");
    try {
      const result = await api("POST", "/sdapi/v1/png-info", { image: dataUrl });
      state.pngParameters = result.info ? result.parameters : null;
      state.pngImage = dataUrl.split(",", 2)[1];
      const others = Object.entries(result.items).map(([k, v]) => `${k}: ${v}`).join("\n");
      html.textContent = [result.info || "This image has no generation parameters.", others]
        .filter(Boolean).join("\n\n");
    } catch (error) {
      html.textContent = error.message;
      html.classList.add("error");
    }
  });
  $("pnginfo_send_to_txt2img").addEventListener("click", () => {
    if (!state.pngParameters) return;
    applyParameters("txt2img", state.pngParameters);
    switchTab("txt2img");
  });
  $("pnginfo_send_to_img2img").addEventListener("click", () => {
    if (state.pngImage) sendImageTo("img2img", state.pngImage);
  });
  $("pnginfo_send_to_inpaint").addEventListener("click", () => {
    if (state.pngImage) sendImageTo("inpaint", state.pngImage);
  });
}

async function main() {
  document.querySelectorAll("#tabs .tab").forEach((button) => {
    button.addEventListener("click", () => switchTab(button.dataset.tab));
  });
  buildTab("txt2img");
  buildTab("img2img");
  state.config = await api("GET", "/internal/config");
  $("setting_CLIP_stop_at_last_layers").max = state.config.clip_skip_max;  // the loaded text encoder's depth
  setupQuicksettings();
  state.config.options = await loadModels();
  for (const tab of ["txt2img", "img2img"]) setupGenerationTab(tab);
  setupTxt2imgExtras();
  setupImg2imgExtras();
  setupPngInfo();
  document.body.dataset.ready = "true";  // for tests and scripts: the page is fully wired
}

main().catch((error) => {
  showSettingStatus(`The page could not start: ${error.message}`, true);
});
