// The Checkpoint Merger tab (A1111's, with its element ids): models A, B, C, the interpolation method, the
// multiplier, fp16 and a baked-in VAE, sent to POST /sdapi/v1/merge; the new file joins the checkpoint list.
"use strict";

function mergerField(id) { return $(`modelmerger_${id}`); }

function buildMergerTab() {
  $("tab_modelmerger").innerHTML = `
    <div class="columns"><div class="column settings">
      <p class="note">A weighted sum of two models, or the difference between B and C added to A. The result is
        saved in the models folder as .safetensors, with the recipe in its metadata.</p>
      <div class="row">
        <label>Primary model (A) <select id="modelmerger_primary_model_name"></select></label>
        <label>Secondary model (B) <select id="modelmerger_secondary_model_name"></select></label>
        <label>Tertiary model (C) <select id="modelmerger_tertiary_model_name"></select></label>
      </div>
      <label>Custom Name (Optional) <input type="text" id="modelmerger_custom_name"></label>
      <label class="slider">Multiplier (M) - set to 0 to get model A
        <input type="range" id="modelmerger_interp_amount" min="0" max="1" step="0.05" value="0.3">
        <input type="number" min="0" max="1" step="0.05" value="0.3"></label>
      <div class="radio" id="modelmerger_interp_method"><span>Interpolation Method</span>
        <label><input type="radio" name="modelmerger_interp_method" value="No interpolation"> No interpolation</label>
        <label><input type="radio" name="modelmerger_interp_method" value="Weighted sum" checked> Weighted sum</label>
        <label><input type="radio" name="modelmerger_interp_method" value="Add difference"> Add difference</label>
      </div>
      <label class="check"><input type="checkbox" id="modelmerger_save_as_half"> Save as float16</label>
      <label>Bake in VAE <select id="modelmerger_bake_in_vae"></select></label>
      <button id="modelmerger_merge" class="primary">Merge</button>
      <div id="modelmerger_result" class="infotext"></div>
    </div></div>`;
  linkSliders($("tab_modelmerger"));
  mergerField("merge").addEventListener("click", runMerge);
}

async function fillMergerLists() {
  const [models, vaes] = await Promise.all([api("GET", "/sdapi/v1/sd-models"), api("GET", "/sdapi/v1/sd-vae")]);
  const titles = models.map((model) => model.title);
  for (const id of ["primary_model_name", "secondary_model_name", "tertiary_model_name"]) {
    const current = mergerField(id).value;
    const primary = id === "primary_model_name";  // B and C start empty: which a merge needs depends on the method
    fillSelect(mergerField(id), primary ? titles : ["", ...titles], current || (primary ? titles[0] : ""));
  }
  fillSelect(mergerField("bake_in_vae"), ["None", ...vaes.map((vae) => vae.model_name)], "None");
}

async function runMerge() {
  const result = mergerField("result");
  const method = document.querySelector("input[name=modelmerger_interp_method]:checked").value;
  const body = {
    primary_model_name: mergerField("primary_model_name").value,
    secondary_model_name: mergerField("secondary_model_name").value || null,
    tertiary_model_name: mergerField("tertiary_model_name").value || null,
    interp_method: method, multiplier: Number(mergerField("interp_amount").value),
    save_as_half: mergerField("save_as_half").checked, custom_name: mergerField("custom_name").value.trim(),
    bake_in_vae: mergerField("bake_in_vae").value,
  };
  mergerField("merge").disabled = true;
  result.classList.remove("error");
  result.textContent = "Merging...";
  try {
    const merged = await api("POST", "/sdapi/v1/merge", body);
    result.textContent = `${merged.info} (Model hash: ${merged.hash})`;
    await fillMergerLists();
    await loadModels();  // app.js: the quicksettings checkpoint list now offers the new model
  } catch (error) {
    result.classList.add("error");
    result.textContent = error.message;
  } finally {
    mergerField("merge").disabled = false;
  }
}

buildMergerTab();
fillMergerLists().catch((error) => { mergerField("result").textContent = error.message; });
