-- Per-image statistics keyed by batch: the distributions drift monitoring compares.
-- Unlabeled images are included: drift needs no labels. Incremental like int_images.
{{
    config(
        materialized='incremental',
        unique_key='image_id',
        incremental_strategy='delete+insert',
        post_hook="delete from {{ this }} where image_id not in (select image_id from {{ ref('int_images') }})",
    )
}}

select
    batch_id,
    image_id,
    split,
    label,
    captured_at,
    brightness,
    contrast,
    ink_fraction,
    edge_strength,
    centroid_x,
    centroid_y,
    orientation,
    red_green,
    blue_yellow,
    red_green_contrast,
    blue_yellow_contrast,
    saturation,
    sharpness,
    aspect_ratio,
    megapixels,
    transformed_at
from {{ ref('int_images') }}
{% if is_incremental() %}
where transformed_at > (select coalesce(max(transformed_at), {{ earliest_timestamp() }}) from {{ this }})
{% endif %}
