-- Orthanc -> radnode auto-routing (loaded by "LuaScripts" in deploy/orthanc.json).
--
-- Every series that becomes stable in Orthanc ("StableAge" seconds after its last instance) is sent
-- to the DICOM modality "radnode" as an asynchronous Orthanc job (see /jobs in Orthanc's REST API).
-- radnode's own results come back into Orthanc and must not go round again: a series is skipped when
-- its Manufacturer is radnode's (RADNODE_MANUFACTURER, "radnode" by default), when its
-- SeriesDescription starts with "AI-generated" (every radnode output series), or when it holds no
-- images (SR, SEG, KO, PR).

local RADNODE_MODALITY = 'radnode'        -- the entry in "DicomModalities"
local RADNODE_MANUFACTURER = 'radnode'    -- keep equal to RADNODE_MANUFACTURER (compared case-insensitively)
local NOT_IMAGES = { SR = true, SEG = true, KO = true, PR = true }

local function Trim(value)
  return string.match(value or '', '^%s*(.-)%s*$')
end

-- True when a series with these main DICOM tags should go to radnode.
function RadnodeShouldReceive(tags)
  if string.lower(Trim(tags['Manufacturer'])) == RADNODE_MANUFACTURER then
    return false
  end
  if string.sub(Trim(tags['SeriesDescription']), 1, 12) == 'AI-generated' then
    return false
  end
  return not NOT_IMAGES[string.upper(Trim(tags['Modality']))]
end

function OnStableSeries(seriesId, tags, metadata)
  if RadnodeShouldReceive(tags) then
    RestApiPost('/modalities/' .. RADNODE_MODALITY .. '/store',
                DumpJson({ Resources = { seriesId }, Synchronous = false }, true), false)
  end
end
