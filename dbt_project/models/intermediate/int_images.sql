-- Every landed image with its resolved label and its split.
--
-- Incremental: a run processes only images ingested (or re-ingested) since the last run and
-- images whose late label changed, so its cost follows the new data, not the history. Rows of a
-- re-ingested batch that are gone from it are removed by the post-hook.
--
-- The label: a late label file wins over the label the batch landed with.
-- The split: a pure function of image_id (md5 bucket 0-99), so an image keeps its split forever.
{{
    config(
        materialized='incremental',
        unique_key='image_id',
        incremental_strategy='delete+insert',
        post_hook="delete from {{ this }} where image_id not in (select image_id from {{ ref('stg_images') }})",
    )
}}

with changed as (
    select *
    from {{ ref('stg_images') }}
    {% if is_incremental() %}
    where ingested_at > (select coalesce(max(ingested_at), {{ earliest_timestamp() }}) from {{ this }})
        or image_id in (
            select image_id
            from {{ ref('stg_labels') }}
            where labeled_at > (select coalesce(max(label_updated_at), {{ earliest_timestamp() }}) from {{ this }})
        )
    {% endif %}
),

bucketed as (
    select
        {{ columns_except(ref('stg_images'), ['label'], 'changed') }},
        coalesce(late.label, changed.label) as label,
        case
            when late.label is not null then 'label_file'
            when changed.label is not null then 'batch'
        end as label_source,
        late.labeled_at as label_updated_at,
        {{ split_bucket('changed.image_id') }} as split_bucket
    from changed
    left join {{ ref('stg_labels') }} as late using (image_id)
)

select
    *,
    case
        when split_bucket < {{ var('train_percent') }} then 'train'
        when split_bucket < {{ var('train_percent') + var('val_percent') }} then 'val'
        else 'test'
    end as split,
    current_timestamp as transformed_at
from bucketed
