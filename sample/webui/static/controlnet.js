// The ControlNet accordion of the txt2img and img2img tabs (sd-webui-controlnet's panel): a few units, each with a
// control image, preprocessor, model, weight, guidance range, control and resize modes, and a preview of the
// preprocessor's map from /controlnet/detect. Enabled units go into the request as
// alwayson_scripts.controlnet.args, in the extension's field names. Uses app.js's globals ($, api, state,
// linkSliders, readFile, payloadExtensions).
"use strict";

const controlnet = { units: 3, modules: null, models: [] };
const CONTROL_MODES = ["Balanced", "My prompt is more important", "ControlNet is more important"];
const CN_RESIZE_MODES = ["Just Resize", "Crop and Resize", "Resize and Fill"];

function cnId(tab, unit, name) {
  return `${tab}_controlnet_unit_${unit}_${name}`;
}

function cnSlider(id, label, min, max, step, value) {
  return `<label class="slider" id="${id}_label"><span>${label}</span>
    <input type="range" id="${id}" min="${min}" max="${max}" step="${step}" value="${value}">
    <input type="number" min="${min}" max="${max}" step="${step}" value="${value}"></label>`;
}

function cnRadio(name, label, choices, selected) {
  const options = choices.map((choice) => `<label><input type="radio" name="${name}" value="${choice}"
    ${choice === selected ? "checked" : ""}> ${choice}</label>`).join("");
  return `<div class="radio"><span>${label}</span>${options}</div>`;
}

function cnUnitHtml(tab, unit) {
  const id = (name) => cnId(tab, unit, name);
  return `<div class="cn-unit accordion" id="${id("panel")}" ${unit ? "hidden" : ""}>
    <div class="cn-images">
      <div class="dropzone cn-dropzone">
        <input type="file" accept="image/*" id="${id("file")}">
        <img id="${id("image")}" alt="" hidden>
        <span class="hint">Drop a control image here or click to choose one${tab === "img2img" ?
          " (none: the img2img image)" : ""}</span>
      </div>
      <div class="dropzone cn-dropzone"><img id="${id("detected")}" alt="" hidden>
        <span class="hint">Preprocessor preview</span></div>
    </div>
    <div class="row">
      <label class="check"><input type="checkbox" id="${id("enabled")}"> Enable</label>
      <label class="check"><input type="checkbox" id="${id("pixel_perfect")}"> Pixel Perfect</label>
    </div>
    <div class="row">
      <label>Preprocessor <select id="${id("module")}"></select></label>
      <button class="tool" id="${id("preview")}" title="Run the preprocessor and show its map">Preview</button>
      <label>Model <select id="${id("model")}"></select></label>
      <button class="tool cn-refresh" title="Refresh the list of ControlNet models">↻</button>
    </div>
    ${cnSlider(id("weight"), "Control Weight", 0, 2, 0.05, 1)}
    <div class="row">
      ${cnSlider(id("guidance_start"), "Starting Control Step", 0, 1, 0.01, 0)}
      ${cnSlider(id("guidance_end"), "Ending Control Step", 0, 1, 0.01, 1)}
    </div>
    ${cnSlider(id("processor_res"), "Preprocessor Resolution", 64, 2048, 1, 512)}
    <div class="row">
      ${cnSlider(id("threshold_a"), "Threshold A", 0, 255, 1, 0)}
      ${cnSlider(id("threshold_b"), "Threshold B", 0, 255, 1, 0)}
    </div>
    ${cnRadio(id("control_mode"), "Control Mode", CONTROL_MODES, CONTROL_MODES[0])}
    ${cnRadio(id("resize_mode"), "Resize Mode", CN_RESIZE_MODES, CN_RESIZE_MODES[1])}
    <div class="cn-status note" id="${id("status")}"></div>
  </div>`;
}

function cnAccordionHtml(tab) {
  const buttons = Array.from({ length: controlnet.units }, (_, unit) =>
    `<button class="tab${unit ? "" : " selected"}" data-unit="${unit}">ControlNet Unit ${unit}</button>`).join("");
  const units = Array.from({ length: controlnet.units }, (_, unit) => cnUnitHtml(tab, unit)).join("");
  return `<label class="check"><input type="checkbox" id="${tab}_controlnet_show"> ControlNet</label>
    <div class="accordion" id="${tab}_controlnet" hidden>
      <nav class="cn-unit-tabs">${buttons}</nav>${units}
    </div>`;
}

// The threshold sliders follow the preprocessor: sd-webui-controlnet's module_detail names, ranges and (when
// `reset`) defaults; the resolution slider hides for Pixel Perfect.
function cnApplyModule(tab, unit, reset = true) {
  const id = (name) => cnId(tab, unit, name);
  const detail = controlnet.modules.module_detail[$(id("module")).value] || { sliders: [] };
  const sliders = detail.sliders.filter((s) => s === null || s.name !== "Preprocessor Resolution");
  const usesResolution = detail.sliders.some((s) => s && s.name === "Preprocessor Resolution");
  $(id("processor_res_label")).hidden = !usesResolution || $(id("pixel_perfect")).checked;
  ["threshold_a", "threshold_b"].forEach((name, index) => {
    const slider = sliders[index];
    const label = $(id(`${name}_label`));
    label.hidden = !slider;
    if (!slider) return;
    label.querySelector("span").textContent = slider.name;
    for (const input of label.querySelectorAll("input")) {
      Object.assign(input, { min: slider.min, max: slider.max, step: slider.step || 1 });
    }
    if (reset) setValue(id(name), slider.value);
  });
}

async function cnLoadModels() {
  controlnet.models = (await api("GET", "/controlnet/model_list")).model_list;
  document.querySelectorAll("select[id$='_model'][id*='_controlnet_unit_']").forEach((select) => {
    fillSelect(select, ["None", ...controlnet.models], select.value || "None");
  });
}

function cnUnitPayload(tab, unit) {
  const id = (name) => cnId(tab, unit, name);
  const image = $(id("image"));
  const module = $(id("module")).value;
  const detail = controlnet.modules.module_detail[module] || { sliders: [] };
  const thresholds = detail.sliders.filter((s) => s === null || s.name !== "Preprocessor Resolution");
  const fields = {
    enabled: true, module, model: $(id("model")).value, weight: number(id("weight")),
    guidance_start: number(id("guidance_start")), guidance_end: number(id("guidance_end")),
    control_mode: radio(id("control_mode")), resize_mode: radio(id("resize_mode")),
    pixel_perfect: $(id("pixel_perfect")).checked, processor_res: number(id("processor_res")),
    threshold_a: thresholds[0] ? number(id("threshold_a")) : -1,
    threshold_b: thresholds[1] ? number(id("threshold_b")) : -1,
  };
  if (!image.hidden && image.src) fields.image = image.src;
  else if (tab === "txt2img") throw new Error(`ControlNet Unit ${unit}: choose a control image first.`);
  if (fields.model === "None") throw new Error(`ControlNet Unit ${unit}: choose a model.`);
  return fields;
}

function cnExtendPayload(tab, payload) {
  if (!$(`${tab}_controlnet_show`).checked) return;
  const units = [];
  for (let unit = 0; unit < controlnet.units; unit++) {
    if ($(cnId(tab, unit, "enabled")).checked) units.push(cnUnitPayload(tab, unit));
  }
  if (units.length) {
    payload.alwayson_scripts = { ...(payload.alwayson_scripts || {}), controlnet: { args: units } };
  }
}

// "ControlNet N" entries of a pasted infotext fill unit N, as the extension's paste does; the control image is not
// in the text (img2img units fall back to the init image).
function cnApplyParameters(tab, parameters) {
  let any = false;
  for (let unit = 0; unit < controlnet.units; unit++) {
    const text = parameters[`ControlNet ${unit}`];
    const id = (name) => cnId(tab, unit, name);
    $(id("enabled")).checked = Boolean(text);
    if (!text) continue;
    any = true;
    const fields = Object.fromEntries(text.split(", ").map((item) => {
      const at = item.indexOf(": ");
      return [item.slice(0, at), item.slice(at + 2)];
    }));
    if (fields.Module) {
      setValue(id("module"), fields.Module);
      cnApplyModule(tab, unit);
    }
    const model = fields.Model || "None";
    const stem = model.replace(/ \[[0-9a-fA-F]{8,10}\]$/, "").toLowerCase();
    setValue(id("model"), controlnet.models.find((label) => label === model) ||
      controlnet.models.find((label) => label.replace(/ \[[0-9a-fA-F]{8,10}\]$/, "").toLowerCase() === stem) ||
      "None");
    const numbers = { Weight: "weight", "Guidance Start": "guidance_start", "Guidance End": "guidance_end",
                      "Processor Res": "processor_res", "Threshold A": "threshold_a", "Threshold B": "threshold_b" };
    for (const [key, name] of Object.entries(numbers)) {
      if (fields[key] !== undefined) setValue(id(name), fields[key]);
    }
    setValue(id("pixel_perfect"), fields["Pixel Perfect"] === "True");
    cnApplyModule(tab, unit, false);
    for (const [key, name] of [["Control Mode", "control_mode"], ["Resize Mode", "resize_mode"]]) {
      const choice = document.querySelector(`input[name="${id(name)}"][value="${fields[key]}"]`);
      if (choice) choice.checked = true;
    }
  }
  setValue(`${tab}_controlnet_show`, any);
  $(`${tab}_controlnet`).hidden = !any;
}

async function cnPreview(tab, unit) {
  const id = (name) => cnId(tab, unit, name);
  const status = $(id("status"));
  let image = $(id("image"));
  if (image.hidden && tab === "img2img") image = $("img2img_init");
  if (image.hidden || !image.src) {
    status.textContent = "Choose a control image first.";
    return;
  }
  const module = $(id("module")).value;
  const body = { controlnet_module: module, controlnet_input_images: [image.src],
                 controlnet_processor_res: number(id("processor_res")) };
  const thresholds = (controlnet.modules.module_detail[module] || { sliders: [] }).sliders
    .filter((s) => s === null || s.name !== "Preprocessor Resolution");
  if (thresholds[0]) body.controlnet_threshold_a = number(id("threshold_a"));
  if (thresholds[1]) body.controlnet_threshold_b = number(id("threshold_b"));
  if (tab === "img2img" && radio("img2img_mode") === "inpaint") body.controlnet_masks = [maskDataUrl()];
  status.textContent = "";
  try {
    const result = await api("POST", "/controlnet/detect", body);
    const detected = $(id("detected"));
    detected.src = `data:image/png;base64,${result.images[0]}`;
    detected.hidden = false;
    detected.parentElement.querySelector(".hint").hidden = true;
  } catch (error) {
    status.textContent = error.message;
  }
}

function cnSetupTab(tab) {
  const settings = document.querySelector(`#tab_${tab} .column.settings`);
  const holder = document.createElement("div");
  holder.className = "cn-holder";
  holder.innerHTML = cnAccordionHtml(tab);
  settings.appendChild(holder);
  linkSliders(holder);
  $(`${tab}_controlnet_show`).addEventListener("change", (event) => {
    $(`${tab}_controlnet`).hidden = !event.target.checked;
  });
  holder.querySelectorAll(".cn-unit-tabs .tab").forEach((button) => {
    button.addEventListener("click", (event) => {
      event.preventDefault();
      holder.querySelectorAll(".cn-unit-tabs .tab").forEach((b) => b.classList.toggle("selected", b === button));
      holder.querySelectorAll(".cn-unit").forEach((panel, unit) => {
        panel.hidden = String(unit) !== button.dataset.unit;
      });
    });
  });
  holder.querySelectorAll(".cn-refresh").forEach((button) => button.addEventListener("click", (event) => {
    event.preventDefault();
    cnLoadModels();
  }));
  for (let unit = 0; unit < controlnet.units; unit++) {
    const id = (name) => cnId(tab, unit, name);
    fillSelect($(id("module")), controlnet.modules.module_list, "none");
    $(id("module")).addEventListener("change", () => cnApplyModule(tab, unit));
    $(id("pixel_perfect")).addEventListener("change", () => cnApplyModule(tab, unit, false));
    $(id("preview")).addEventListener("click", (event) => {
      event.preventDefault();
      cnPreview(tab, unit);
    });
    $(id("file")).addEventListener("change", async (event) => {
      const file = event.target.files[0];
      if (!file) return;
      const image = $(id("image"));
      image.src = await readFile(file);
      image.hidden = false;
      image.parentElement.querySelector(".hint").hidden = true;
      $(id("enabled")).checked = true;  // as the extension does when an image is given
    });
    cnApplyModule(tab, unit);
  }
}

function cnAddStyle() {
  const style = document.createElement("style");
  style.textContent = `
    .cn-unit-tabs { display: flex; gap: 4px; flex-wrap: wrap; }
    .cn-images { display: grid; grid-template-columns: 1fr 1fr; gap: 8px; }
    .cn-dropzone { min-height: 120px; }
    .cn-status { color: var(--error, #d33); }`;
  document.head.appendChild(style);
}

async function cnMain() {
  // The tabs are built and wired by app.js's main(); it marks the body when done.
  if (document.body.dataset.ready !== "true") {
    await new Promise((resolve) => {
      const observer = new MutationObserver(() => {
        if (document.body.dataset.ready === "true") {
          observer.disconnect();
          resolve();
        }
      });
      observer.observe(document.body, { attributes: true, attributeFilter: ["data-ready"] });
    });
  }
  controlnet.modules = await api("GET", "/controlnet/module_list");
  cnAddStyle();
  for (const tab of ["txt2img", "img2img"]) cnSetupTab(tab);
  await cnLoadModels();
  payloadExtensions.push(cnExtendPayload);
  parameterExtensions.push(cnApplyParameters);
  document.body.dataset.controlnetReady = "true";  // for tests and scripts: the accordion is wired
}

cnMain().catch((error) => {
  showSettingStatus(`The ControlNet panel could not start: ${error.message}`, true);
});
