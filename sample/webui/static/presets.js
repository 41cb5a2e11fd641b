// Generation presets on the txt2img tab (GET /ldm/presets, sample.models.PRESETS), in a menu beside the Live box.
// Choosing one selects its model and fills the sampler, schedule type, steps and CFG fields, which stay editable.
// Its LoRA tags go into every request's prompt but not into the prompt box, so typing (and Live mode) edits only the
// user's words; the image's infotext records the tags, so pasting it back reproduces the image, and a tag the prompt
// already has is not added again. Loaded after live.js, whose toggle it sits next to.
"use strict";

const presets = { list: [] };

function selectedPreset() {
  return presets.list.find((preset) => preset.name === $("txt2img_preset").value) || null;
}

// The prompt a txt2img request sends: the box's text plus the selected preset's LoRA tags it does not already name.
function promptWithPreset(prompt) {
  const preset = selectedPreset();
  if (!preset) return prompt;
  const tags = preset.loras
    .filter((lora) => !prompt.includes(`<lora:${lora.name}:`) && !prompt.includes(`<lora:${lora.name}>`))
    .map((lora) => `<lora:${lora.name}:${lora.strength}>`);
  return [prompt, ...tags].filter(Boolean).join(" ");
}

function applyPreset() {
  const preset = selectedPreset();
  if (!preset) return;
  setValue("txt2img_sampling", preset.sampler_name);
  setValue("txt2img_scheduler", preset.scheduler);
  setValue("txt2img_steps", preset.steps);
  setValue("txt2img_cfg_scale", preset.cfg_scale);
  const checkpoint = $("setting_sd_model_checkpoint");
  if (checkpoint.value !== preset.sd_model_checkpoint) {
    checkpoint.value = preset.sd_model_checkpoint;
    checkpoint.dispatchEvent(new Event("change"));  // the quicksetting's handler loads the model
  }
}

async function setupPresets() {
  const label = document.createElement("label");
  label.className = "preset-menu";
  label.title = "Preset: a model, LoRAs and sampler settings under one name (e.g. a fast LCM preset for Live)";
  const select = document.createElement("select");
  select.id = "txt2img_preset";
  label.append("Preset ", select);
  label.hidden = true;
  $("txt2img_live").parentElement.after(label);
  presets.list = await api("GET", "/ldm/presets");
  fillSelect(select, ["None", ...presets.list.map((preset) => preset.name)], "None");
  label.hidden = presets.list.length === 0;
  select.addEventListener("change", applyPreset);
}

setupPresets().catch((error) => showSettingStatus(`Presets could not be listed: ${error.message}`, true));
